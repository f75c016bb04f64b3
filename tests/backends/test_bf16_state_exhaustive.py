"""csrc/cpu/bf16_state_avx2.h's random bits and stochastic rounding, which the CPU's bf16-state
loop uses for fp32 and bf16 params, and bf16x8_avx2.h's nearest rounding of bf16 params, against
adam_math.h's scalar rules on all 2**32 inputs:
tests/backends/bf16_state_avx2_test.cpp, plain C++ (no torch) built by g++ in about a second and
run in ~12 s (it says "skip" on a CPU without AVX2)."""
from __future__ import annotations

import os

from tests._cxx import build_and_run_avx2, needs_gxx

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = needs_gxx


def _run(tmp_path, *defines):
    return build_and_run_avx2(os.path.join(HERE, "bf16_state_avx2_test.cpp"), tmp_path, *defines)


def test_avx2_random_bits_and_rounding_equal_the_scalar_rules_on_every_input(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("bf16_state_avx2_test: ok"), res.stdout


def test_a_slip_in_the_rounding_is_caught(tmp_path):
    # 17 random bits added instead of 16: a carry into the kept half that the rule never makes
    res = _run(tmp_path, "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "1 inputs differ" in res.stdout, res.stdout


def test_a_slip_in_the_nearest_rounding_is_caught(tmp_path):
    # the tie-to-even bit forgotten: ties of an odd kept half round down
    res = _run(tmp_path, "-DONEPASS_PLANTED_BUG=2")
    assert res.returncode == 1 and "1 inputs differ" in res.stdout, res.stdout
