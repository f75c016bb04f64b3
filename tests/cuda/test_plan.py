"""The CUDA backend's planner (csrc/cuda/plan.h), unit-tested on the CPU: tests/cuda/plan_test.cpp
plans randomized batches (sizes 0, 1, primes, vector tails, misaligned views, sizes above 2**31
in metadata only) and walks every block and thread with the kernels' own lookups. It is plain
C++ with no CUDA or torch, so g++ builds it in about a second."""
from __future__ import annotations

import os

from tests._cxx import build_and_run, needs_gxx

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = needs_gxx


def _run(tmp_path, *defines):
    return build_and_run(os.path.join(HERE, "plan_test.cpp"), tmp_path, *defines, args=["300"])


def test_every_element_once_every_vector_access_aligned(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0, res.stdout
    assert res.stdout.startswith("plan_test: ok"), res.stdout


def test_an_off_by_one_lookup_is_caught(tmp_path):
    # the bug tests/emu/test_planted_bugs.py plants in the kernels, caught here without running one
    res = _run(tmp_path, "-DONEPASS_PLANTED_BUG=1")
    assert res.returncode == 1 and "found tensor" in res.stdout, res.stdout
