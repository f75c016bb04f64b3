"""The lane-order loads and stores that the CPU's hand loops use for bf16 params
(csrc/cpu/bf16x8_avx2.h, float_map_avx2.h) against the element order they must keep:
tests/backends/lane_order_avx2_test.cpp, plain C++ (no torch) built by g++ in about a second (it
says "skip" on a CPU without AVX2). The whole loops are checked against the reference in
test_lowp_cpu.py; this pins the helpers themselves, on every bf16 pattern and every code."""
from __future__ import annotations

import os

from tests._cxx import build_and_run_avx2, needs_gxx

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = needs_gxx


def _run(tmp_path, *defines):
    return build_and_run_avx2(os.path.join(HERE, "lane_order_avx2_test.cpp"), tmp_path, *defines)


def test_lane_order_loads_and_stores_keep_every_element_in_place(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("lane_order_avx2_test: ok"), res.stdout


def test_codes_stored_with_the_in_order_permutation_are_caught(tmp_path):
    # store_codes32's permutation on lane-order codes: elements 8-15 and 16-23 trade places
    res = _run(tmp_path, "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "0 bf16 and" in res.stdout and "code checks differ" in res.stdout, \
        res.stdout


def test_bf16_stored_as_if_in_order_is_caught(tmp_path):
    # a and b taken for elements 0-7 and 8-15: every store of the 4096 groups is out of place
    res = _run(tmp_path, "-DONEPASS_PLANTED_BUG=2")
    assert res.returncode == 1 and " 0 code checks differ" in res.stdout \
        and "lane_order_avx2_test: 0 bf16" not in res.stdout, res.stdout
