"""The plan's validity rules under random in-place changes (tests/plan_fuzz.py), every planned
backend against the reference after every step, each in a subprocess: a segfault (a kernel
writing through a pointer the plan should have dropped) fails the test with the episode's log
instead of killing the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onepass import _ops
from onepass.backends import BACKENDS

ROOT = Path(__file__).resolve().parent.parent

# (backend, episodes): ~5 s each on 2 cores; triton's interpreter is ~20x slower an episode
RUNS = [("cpu", 60), ("cuda-emu", 40), ("triton", 12)]


@pytest.mark.skipif(not _ops.HAS_EXT, reason="the plan lives in the compiled extension")
@pytest.mark.parametrize("backend,episodes", RUNS)
def test_random_in_place_changes_agree_with_the_reference(backend, episodes):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "tests.plan_fuzz", backend, "0", str(episodes)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = "\n".join(run.stdout.splitlines()[-5:] + run.stderr.splitlines()[-5:])
    assert run.returncode == 0, f"exit {run.returncode} (negative: killed by that signal)\n{tail}"
    assert run.stdout.count("seed ") == episodes, tail
    # the episodes made the changes they are for, refused steps included
    assert "share_memory" in run.stdout and "resize_state" in run.stdout
    assert "both raised" in run.stdout
