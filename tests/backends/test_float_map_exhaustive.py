"""adam_math.h's fused v code (float_map_code_v_kept) against the rule it fuses on every float32
input: tests/backends/float_map_test.cpp, plain C++ (no torch), built by g++ in about a second
and run over all 2**32 bit patterns in ~6 s."""
from __future__ import annotations

import os

from tests._cxx import build_and_run, needs_gxx

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = needs_gxx


def _run(tmp_path, *defines):
    return build_and_run(os.path.join(HERE, "float_map_test.cpp"), tmp_path, *defines)


def test_fused_v_code_equals_keep_positive_of_the_search_on_every_float(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("float_map_test: ok"), res.stdout


def test_a_one_value_slip_is_caught(tmp_path):
    # +0.0 taken for positive: code 1 instead of 0 for that one pattern
    res = _run(tmp_path, "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "1 patterns differ" in res.stdout, res.stdout
