"""The SIMT emulation itself (csrc/emu/simt.h): small kernels compiled with g++ against it
(tests/emu/simt_probe.cpp) give a GPU's answers when they are right, and wrong answers or errors
when they break CUDA's rules, so a kernel bug cannot hide behind the emulation."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "..", "..", "csrc")

pytestmark = [pytest.mark.emu,
              pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    exe = str(tmp_path_factory.mktemp("simt") / "simt_probe")
    subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas",
                    "-I" + CSRC, os.path.join(HERE, "simt_probe.cpp"),
                    os.path.join(CSRC, "emu", "simt.cpp"), "-o", exe], check=True)

    def run(*args):
        out = subprocess.run([exe, *args], check=True, capture_output=True, text=True).stdout
        return dict(line.split(": ", 1) for line in out.splitlines())
    return run


def test_correct_kernels_give_the_gpu_answer(probe):
    res = probe()
    assert res["sum"] == "ok"                # shared memory, a barrier, a shuffle tree
    assert res["ballot_and_down"] == "ok"    # __ballot_sync, __shfl_down_sync at the warp's edge


def test_a_missing_barrier_reads_unwritten_shared_memory(probe):
    # threads run in index order until they block, and shared memory starts as 0xFF bytes, so
    # thread 0 sums values the other threads have not stored yet
    assert probe()["sum_without_sync"] == "wrong"


def test_reverse_order_is_schedule_independent_for_correct_kernels(probe):
    res = probe("reverse")
    assert res["sum"] == "ok" and res["ballot_and_down"] == "ok"


def test_a_wrong_shuffle_offset_is_a_wrong_sum(probe):
    assert probe()["sum_wrong_offset"] == "wrong"


def test_divergent_barriers_and_shuffles_are_errors_not_hangs(probe):
    res = probe()
    assert res["exit_then_barrier"].startswith("error:") and "divergent __syncthreads" in res["exit_then_barrier"]
    assert res["half_warp_shuffle"].startswith("error:") and "deadlock" in res["half_warp_shuffle"]
    assert probe("reverse")["half_warp_shuffle"].startswith("error:")


def test_a_misaligned_vector_access_is_an_error(probe):
    assert "misaligned 16-byte load" in probe()["misaligned"]
