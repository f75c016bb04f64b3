"""Standalone C++ test programs (plain C++ against csrc/ headers, no torch): built by g++ with
warnings as errors, then run. Used by tests/cuda/test_plan.py,
tests/backends/test_float_map_exhaustive.py, tests/backends/test_bf16_state_exhaustive.py,
tests/backends/test_bf16_state_loop_avx2.py and tests/backends/test_lane_order_avx2.py."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")


def build_and_run(source: str, tmp_path, *defines: str, args=()) -> subprocess.CompletedProcess:
    """Builds ``source`` (-O2, C++20, -Wall -Werror, csrc/ on the include path, ``defines``) in
    ``tmp_path`` and runs it with ``args``; returns the finished process (stdout captured).
    -ffp-contract=off as the extension is built (python/onepass/_build.py): g++ fuses a*b+c into
    an FMA by default in C++ wherever the target has one (AVX-512 does), which changes the bits."""
    exe = str(tmp_path / os.path.splitext(os.path.basename(source))[0])
    subprocess.run(["g++", "-std=c++20", "-O2", "-ffp-contract=off", "-Wall", "-Werror",
                    "-I" + CSRC, *defines, source, "-o", exe], check=True)
    return subprocess.run([exe, *args], capture_output=True, text=True)


def _or_skip(res: subprocess.CompletedProcess, isa: str) -> subprocess.CompletedProcess:
    # (the program printed "skip": the CPU lacks the ISA, and the kernel never takes that code)
    if "skip" in res.stdout:
        pytest.skip(f"the CPU has no {isa}: the CPU kernel does not take its {isa} loops here")
    return res


def build_and_run_avx2(source: str, tmp_path, *defines: str) -> subprocess.CompletedProcess:
    """build_and_run for a program of csrc/cpu's AVX2 loops, which prints "skip" on a CPU without
    AVX2 (the kernel then never takes those loops): the test is skipped there."""
    return _or_skip(build_and_run(source, tmp_path, *defines), "AVX2")


def build_and_run_avx512(source: str, tmp_path, *defines: str) -> subprocess.CompletedProcess:
    """build_and_run for a program of csrc/cpu's AVX-512 code, which prints "skip" on a CPU
    without AVX-512 F, BW, VL and DQ (the kernel then never takes that code): skipped there."""
    return _or_skip(build_and_run(source, tmp_path, *defines), "AVX-512")
