"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): one ``--quick``
smoke run of ``python -m onepass`` in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from onepass import benchmark as b

# the source tree's package, for the subprocess (as when not installed)
PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python")


def test_cli_quick_json(tmp_path):
    out = tmp_path / "result.json"
    pythonpath = os.pathsep.join(filter(None, [PYTHON_DIR, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    # Peers without torch.compile (torchao's first steps compile for tens of seconds): each one
    # runs when installed and is listed as skipped when not.
    names = ["onepass", "onepass-int8", "torch-fused", "torch-foreach", "torch-forloop", "optimi",
             "bitsandbytes-8bit"]
    # One thread: this checks the pipeline, not speed, and a single thread keeps it fast even when
    # other processes (a parallel build, other tests) occupy the cores, where every OpenMP region of a
    # multi-threaded step would wait for a descheduled thread.
    proc = subprocess.run(
        [sys.executable, "-m", "onepass", "--quick", "--device", "cpu", "--threads", "1",
         "--no-progress", "--accuracy-steps", "5", "--contestants", ",".join(names),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ms/step" in proc.stdout and "rel err" in proc.stdout  # the table is printed

    result = json.loads(out.read_text())
    assert result["machine"]["torch"] == torch.__version__
    assert result["config"]["quick"] is True and result["machine"]["threads"] == 1
    assert result["config"]["accuracy"]["steps"] == 5
    assert [c["case"] for c in result["cases"]] == ["gpt2", "small"]
    factories, _ = b.available_contestants("cpu", names)  # what this environment can run
    for case in result["cases"]:
        ran = {c["name"]: c for c in case["contestants"]}
        assert case["errors"] == {}
        # Every contestant either ran or was skipped with a reason; none vanished.
        assert set(ran) | set(case["skipped"]) == set(names)
        assert all(case["skipped"].values())
        assert set(factories) <= set(ran)  # everything available here ran there
        assert {"torch-fused", "torch-foreach", "torch-forloop"} <= set(ran)
        for c in ran.values():
            assert c["ms"] > 0 and all(t > 0 for t in c["ms_all"]) and c["gbps"] > 0
            assert c["rounds"] == len(c["ms_all"]) >= 1
            assert math.isfinite(c["x_torch_fused"])
            assert c["state_bytes_per_param"] > 0
            assert c["accuracy"]["finite"] and c["accuracy"]["steps"] == 5
        assert ran["torch-foreach"]["accuracy"]["rel"] < 1e-5
        assert case["ceiling"]["ms"] > 0
