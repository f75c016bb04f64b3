"""The CPU's bf16-state hand loop as a whole (csrc/cpu/bf16_state_avx2.h: bf16_state_avx2) against
the scalar rules, element by element: its random bits keyed once per 65536-aligned run of indices
and in full across a run's boundary, its NaN moments and bf16 params fixed only where a vector
holds one.
tests/backends/bf16_state_loop_avx2_test.cpp, plain C++ (no torch) built by g++ in a few seconds
(it says "skip" on a CPU without AVX2). The kernel's own walks start at multiples of 16 elements;
this also takes starts that are not, near 2**32's end, and NaNs of every kind. Each test runs
twice: on the AVX2 loop, and (built with ONEPASS_LOOP_AVX512) on csrc/cpu/bf16_state_avx512.h's,
the avx512 variant's (skipped on a CPU without AVX-512)."""
from __future__ import annotations

import os

import pytest

from tests._cxx import build_and_run_avx2, build_and_run_avx512, needs_gxx

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = needs_gxx


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    return request.param


def _run(tmp_path, isa, *defines):
    source = os.path.join(HERE, "bf16_state_loop_avx2_test.cpp")
    if isa == "avx512":
        return build_and_run_avx512(source, tmp_path, "-DONEPASS_LOOP_AVX512", *defines)
    return build_and_run_avx2(source, tmp_path, *defines)


def test_bf16_state_loop_matches_the_scalar_rules(tmp_path, isa):
    res = _run(tmp_path, isa)
    assert res.returncode == 0 and res.stdout.startswith(f"bf16_state_loop_{isa}_test: ok"), \
        res.stdout


def test_runs_keyed_by_the_first_block_are_caught(tmp_path, isa):
    # every run past the first 65536-block of a range draws another element's bits
    res = _run(tmp_path, isa, "-DONEPASS_PLANTED_LOOP_BUG=1")
    assert res.returncode == 1 and "elements differ" in res.stdout, res.stdout


def test_unfixed_nan_lanes_are_caught(tmp_path, isa):
    # a NaN moment keeps its sum with the random bits (a negative NaN, or a payload that carries)
    res = _run(tmp_path, isa, "-DONEPASS_PLANTED_LOOP_BUG=2")
    assert res.returncode == 1 and "elements differ" in res.stdout and "7fc0" in res.stdout, \
        res.stdout


def test_unfixed_nan_params_are_caught(tmp_path, isa):
    # a bf16 param's NaN keeps its rounded sum (store_bf16x16_nearest without the fix)
    res = _run(tmp_path, isa, "-DONEPASS_PLANTED_LOOP_BUG=3")
    assert res.returncode == 1 and "elements differ" in res.stdout, res.stdout
