"""The float3 code rules against their statements on every float32 input, as plain C++ programs
(no torch) built by g++ in about a second each:
- adam_math.h's fused v code (float_map_code_v_kept) against the rule it fuses
  (tests/backends/float_map_test.cpp, all 2**32 bit patterns in ~6 s);
- csrc/cpu/float_map_avx2.h's AVX2 codes and values, which the CPU's int8 loop uses for fp32
  params, against adam_math.h's scalar rules (tests/backends/float_map_avx2_test.cpp, all 2**32
  patterns and 256 codes in ~16 s; it says "skip" on a CPU without AVX2);
- csrc/cpu/float_map_avx512.h's 16-lane codes, values and bf16 rounding, which the CPU's int8
  loop uses where the CPU has AVX-512, against the same rules
  (tests/backends/float_map_avx512_test.cpp, ~20 s; "skip" on a CPU without AVX-512)."""
from __future__ import annotations

import os

from tests._cxx import build_and_run, build_and_run_avx2, build_and_run_avx512, needs_gxx

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = needs_gxx


def _run(tmp_path, source, *defines):
    return build_and_run(os.path.join(HERE, source), tmp_path, *defines)


def test_fused_v_code_equals_keep_positive_of_the_search_on_every_float(tmp_path):
    res = _run(tmp_path, "float_map_test.cpp")
    assert res.returncode == 0 and res.stdout.startswith("float_map_test: ok"), res.stdout


def test_a_one_value_slip_is_caught(tmp_path):
    # +0.0 taken for positive: code 1 instead of 0 for that one pattern
    res = _run(tmp_path, "float_map_test.cpp", "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "1 patterns differ" in res.stdout, res.stdout


def _avx2(tmp_path, *defines):
    return build_and_run_avx2(os.path.join(HERE, "float_map_avx2_test.cpp"), tmp_path, *defines)


def test_avx2_codes_and_values_equal_the_scalar_rules_on_every_float(tmp_path):
    res = _avx2(tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("float_map_avx2_test: ok"), res.stdout


def test_a_one_value_slip_in_the_avx2_m_code_is_caught(tmp_path):
    # the m code's zero threshold one pattern too high: code 128 instead of 129 for one input
    res = _avx2(tmp_path, "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "pattern 37200001: codes m 128" in res.stdout, res.stdout


def _avx512(tmp_path, *defines):
    return build_and_run_avx512(os.path.join(HERE, "float_map_avx512_test.cpp"), tmp_path, *defines)


def test_avx512_codes_values_and_bf16_rounding_equal_the_scalar_rules_on_every_float(tmp_path):
    res = _avx512(tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("float_map_avx512_test: ok"), res.stdout


def test_a_one_value_slip_in_the_avx512_m_code_is_caught(tmp_path):
    # the m code's threshold one pattern too high: code 128 instead of 129 for one input
    res = _avx512(tmp_path, "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "pattern 37200001: codes m 128" in res.stdout, res.stdout


def test_unfixed_nan_bf16_params_in_the_avx512_store_are_caught(tmp_path):
    # a NaN param keeps its rounded sum (store16 without the fix): NaNs with a carrying payload
    res = _avx512(tmp_path, "-DONEPASS_PLANTED_LOOP_BUG=3")
    assert res.returncode == 1 and "patterns differ" in res.stdout and "7fc0" in res.stdout, \
        res.stdout
