"""Fast unit tests for onepass.benchmark and ``python -m onepass`` (seconds, CPU only).

They check the case definitions, the byte accounting and the arithmetic of the derived figures on
synthetic numbers (no timing is asserted), plus one ``--quick`` smoke run of the command in a
subprocess. The benchmark itself (real cases, real timings) runs by hand: ``python -m onepass`` or
``pytest bench/ --benchmark-only``.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
try:
    from onepass import benchmark as b
except ImportError:
    # Not installed yet (pip install -e .): use the source tree. Harmless once it is installed.
    sys.path.insert(0, PYTHON_DIR)
    from onepass import benchmark as b


# --- cases -------------------------------------------------------------------------------------------

def test_gpt2_counts():
    shapes = b.gpt2()
    b.check_gpt2_counts(shapes)
    assert len(shapes) == 148 == b.GPT2_TENSORS
    assert b.count_params(shapes) == 124_439_808 == b.GPT2_PARAMS
    assert shapes[0] == (50257, 768) and shapes[1] == (1024, 768)  # wte, wpe
    assert shapes[2:14] == [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                            (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    assert shapes[-2:] == [(768,), (768,)]  # ln_f
    with pytest.raises(AssertionError):
        b.check_gpt2_counts(b.gpt2(n_layer=11))


def test_small_and_huge_shapes():
    assert b.small() == [(4096,)] * 2000
    assert b.huge("cpu") == [(2**27,)]
    assert b.huge("cuda") == [(2**30,)]
    assert b.huge(torch.device("cuda", 0)) == [(2**30,)]
    assert b.case_shapes("small") == b.small()
    assert b.case_shapes("gpt2") == b.gpt2()
    assert b.case_shapes("huge", "cpu") == [(2**27,)]
    # --quick keeps the structure but shrinks the cases.
    q = b.case_shapes("gpt2", quick=True)
    assert len(q) == 2 + 12 + 2 and b.count_params(q) < 10**7
    assert len(b.case_shapes("small", quick=True)) < 2000
    with pytest.raises(ValueError, match="unknown case"):
        b.case_shapes("nope")


def test_make_params_shared_inputs():
    ps = b.make_params([(3, 5), (7,)], "cpu", "fp32", seed=3)
    again = b.make_params([(3, 5), (7,)], "cpu", "fp32", seed=3)
    for p, q in zip(ps, again):
        assert isinstance(p, torch.nn.Parameter) and p.is_leaf
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.shape == p.shape
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)  # deterministic
        assert (p.grad != 0).all()  # gradients are never zero
        assert p.abs().max() < 0.2 and p.grad.abs().max() < 0.01  # randn*0.02, randn*1e-3
    bf = b.make_params([(4,)], "cpu", "bf16")
    assert bf[0].dtype == torch.bfloat16 and bf[0].grad.dtype == torch.bfloat16


# --- byte accounting ---------------------------------------------------------------------------------

def test_bytes_per_param():
    assert b.bytes_per_param(4, 4, 8) == 28  # fp32 params, grads, state
    assert b.bytes_per_param() == 28
    assert b.bytes_per_param(2, 2, 4) == 14  # bf16 params, grads, state
    assert b.bytes_per_param(2, 2, 8) == 22  # bf16 params with fp32 state
    assert b.bytes_per_param(4, 4, 2) == 16  # 8-bit m and v


@pytest.mark.parametrize("dtype,per_param", [("fp32", 28), ("bf16", 14)])
def test_state_and_bytes_moved(dtype, per_param):
    ps = b.make_params([(10, 3), (17,)], "cpu", dtype)
    n = 47
    assert b.bytes_moved(ps) == per_param * n  # torch's layout assumed
    opt = torch.optim.AdamW(ps, lr=b.LR, weight_decay=b.WEIGHT_DECAY, foreach=False)
    assert b.state_nbytes(opt) == 0
    opt.step()
    elt = ps[0].element_size()
    assert b.state_nbytes(opt) == 2 * elt * n  # exp_avg + exp_avg_sq; the 0-dim step is not counted
    assert b.bytes_moved(ps, b.state_nbytes(opt)) == per_param * n


def test_state_nbytes_counts_a_shared_tensor_once():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([p], lr=0.1)
    buf = torch.zeros(8)
    opt.state[p] = {"a": buf, "b": buf, "step": torch.tensor(1.0)}
    assert b.state_nbytes(opt) == 32


# --- derived figures and the table ---------------------------------------------------------------------

def _synthetic_case(with_fused=True):
    contestants = [{"name": "onepass", "ms": 5.0, "bytes_per_step": 100_000_000}]
    if with_fused:
        contestants.append({"name": "torch-fused", "ms": 10.0, "bytes_per_step": 100_000_000})
    contestants.append({"name": "torch-forloop", "ms": 40.0, "bytes_per_step": 100_000_000})
    return {"case": "synthetic", "n_tensors": 2, "n_params": 100_000_000 // 28, "dtype": "fp32",
            "rounds": 3, "warmup": 1,
            "ceiling": {"kind": "mul_", "bytes": 2_000_000_000, "ms": 100.0},
            "contestants": contestants, "skipped": {"optimi": "not installed"},
            "errors": {"bitsandbytes": "RuntimeError: boom"}}


def test_derive_arithmetic():
    case = b.derive(_synthetic_case())
    assert case["ceiling"]["gbps"] == pytest.approx(20.0)  # 2 GB in 0.1 s
    by = {c["name"]: c for c in case["contestants"]}
    assert by["torch-fused"]["gbps"] == pytest.approx(10.0)  # 0.1 GB in 10 ms
    assert by["onepass"]["gbps"] == pytest.approx(20.0)
    assert by["torch-forloop"]["gbps"] == pytest.approx(2.5)
    assert by["onepass"]["frac_ceiling"] == pytest.approx(1.0)
    assert by["torch-fused"]["frac_ceiling"] == pytest.approx(0.5)
    assert by["torch-forloop"]["frac_ceiling"] == pytest.approx(0.125)
    # ratio = time(torch-fused) / time(contestant): > 1 is faster than torch fused.
    assert by["onepass"]["x_torch_fused"] == pytest.approx(2.0)
    assert by["torch-fused"]["x_torch_fused"] == pytest.approx(1.0)
    assert by["torch-forloop"]["x_torch_fused"] == pytest.approx(0.25)
    assert by["onepass"]["bytes_per_param"] == pytest.approx(28.0, rel=1e-6)
    json.dumps(case)  # plain data

    no_ref = b.derive(_synthetic_case(with_fused=False))
    assert all(c["x_torch_fused"] is None for c in no_ref["contestants"])


def test_format_table():
    case = b.derive(_synthetic_case())
    text = b.format_table([case])
    lines = text.splitlines()
    assert lines[0].split() == ["case", "contestant", "ms/step", "GB/s", "B/param", "state", "B/p",
                                "of", "ceiling", "x", "torch-fused"]
    row = next(line for line in lines if "onepass" in line)
    assert row.split() == ["synthetic", "onepass", "5.000", "20.0", "28.0", "-", "1.00", "2.00"]
    forloop = next(line for line in lines if "torch-forloop" in line)
    assert forloop.split() == ["torch-forloop", "40.000", "2.5", "28.0", "-", "0.12", "0.25"]
    assert any("ceiling mul_" in line and "20.0" in line for line in lines)
    assert "synthetic: optimi skipped: not installed" in text
    assert "synthetic: bitsandbytes ERROR: RuntimeError: boom" in text
    # The full result (with machine info) gets a header; a skip seen in every case is said once.
    result = {"machine": b.machine_info("cpu"),
              "config": {"device": "cpu", "dtype": "fp32", "rounds": 3, "warmup": 1, "quick": True},
              "cases": [case, dict(b.derive(_synthetic_case()), case="other")]}
    full = b.format_table(result)
    assert "torch " + torch.__version__ in full
    assert "\noptimi skipped: not installed" in full


def test_machine_info():
    info = b.machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert info["device"] == "cpu" and info["device_name"]
    assert "git_commit" in info and "onepass" in info and info["date"]
    json.dumps(info)


# --- contestants and a tiny in-process run -------------------------------------------------------------

def test_available_contestants_skip_not_fail(monkeypatch):
    def missing(params, lr, wd):
        raise ModuleNotFoundError("No module named 'ghost'")

    monkeypatch.setitem(b.CONTESTANTS, "ghost", b.Contestant("ghost", missing, "missing peer"))
    factories, skipped = b.available_contestants(
        "cpu", ["torch-fused", "torch-foreach", "torch-forloop", "torchao", "ghost"])
    assert set(factories) == {"torch-fused", "torch-foreach", "torch-forloop"}
    assert skipped["torchao"] == "CUDA only"
    assert "not installed" in skipped["ghost"]
    with pytest.raises(ValueError, match="unknown contestant"):
        b.available_contestants("cpu", ["no-such-optimizer"])
    # The defaults include onepass and the optional peers; each is either available or skipped.
    factories, skipped = b.available_contestants("cpu")
    assert set(factories) | set(skipped) == set(b.DEFAULT_CONTESTANTS)


def test_run_case_tiny_drops_a_failing_contestant():
    class Boom(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("kaput")

    factories = {"torch-fused": b.make_factory("torch-fused"),
                 "torch-forloop": b.make_factory("torch-forloop"),
                 "boom": lambda ps: Boom(ps, lr=0.1)}
    case = b.run_case("tiny", [(64, 3), (5,)], factories, "cpu", "fp32", rounds=3, warmup=1,
                      skipped={"optimi": "not installed"}, slow_limit=100)
    assert [c["name"] for c in case["contestants"]] == ["torch-fused"]
    assert case["skipped"]["torch-forloop"].startswith("slow")
    assert case["skipped"]["optimi"] == "not installed"
    assert case["errors"] == {"boom": "RuntimeError: kaput"}
    fused = case["contestants"][0]
    assert len(fused["ms_all"]) == 3 and fused["ms"] > 0 and fused["x_torch_fused"] == 1.0
    assert fused["bytes_per_step"] == 28 * 197 and case["ceiling"]["bytes"] == 2 * 4 * 4 * 197
    assert case["ceiling"]["gbps"] > 0
    json.dumps(case)


def test_progress_bar_only_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = b.Progress(stream=out, width=10)
    bar.update(5, 10, "gpt2 torch-fused")
    assert out.getvalue() == "\r[#####     ] gpt2 torch-fused 5/10"
    bar.clear()
    assert out.getvalue().endswith("\r")
    quiet = Tty()
    b.Progress(enabled=False, stream=quiet).update(1, 2, "x")
    not_tty = io.StringIO()
    b.Progress(enabled=True, stream=not_tty).update(1, 2, "x")
    assert quiet.getvalue() == "" and not_tty.getvalue() == ""


# --- the command -------------------------------------------------------------------------------------

def test_cli_quick_json(tmp_path):
    out = tmp_path / "result.json"
    pythonpath = os.pathsep.join(filter(None, [PYTHON_DIR, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    # One thread: this checks the pipeline, not speed, and a single thread keeps it fast even when
    # other processes (a parallel build, other tests) occupy the cores, where every OpenMP region of a
    # multi-threaded step would wait for a descheduled thread.
    proc = subprocess.run(
        [sys.executable, "-m", "onepass", "--quick", "--device", "cpu", "--threads", "1",
         "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ms/step" in proc.stdout  # the table is printed

    result = json.loads(out.read_text())
    assert result["machine"]["torch"] == torch.__version__
    assert result["config"]["quick"] is True and result["machine"]["threads"] == 1
    assert [c["case"] for c in result["cases"]] == ["gpt2", "small"]
    factories, _ = b.available_contestants("cpu")  # what this environment can run
    for case in result["cases"]:
        ran = {c["name"]: c for c in case["contestants"]}
        assert case["errors"] == {}
        # Every contestant either ran or was skipped with a reason; none vanished.
        assert set(ran) | set(case["skipped"]) == set(b.DEFAULT_CONTESTANTS)
        assert set(factories) <= set(ran)  # everything available here ran there
        assert {"torch-fused", "torch-foreach", "torch-forloop"} <= set(ran)
        for c in ran.values():
            assert c["ms"] > 0 and all(t > 0 for t in c["ms_all"]) and c["gbps"] > 0
            assert math.isfinite(c["x_torch_fused"])
        assert case["ceiling"]["ms"] > 0
