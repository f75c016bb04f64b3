"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): the contestants and
a tiny in-process run: a contestant which cannot run is listed with its reason
(onepass.benchmark.contestants, run)."""

from __future__ import annotations

import importlib
import io
import json

import pytest
import torch

from onepass import benchmark as b


def test_available_contestants_skip_not_fail(monkeypatch):
    def missing(params, lr, wd):
        raise ModuleNotFoundError("No module named 'ghost'")

    def unsupported(params, lr, wd):
        class NoCpu(torch.optim.SGD):
            def step(self, closure=None):
                raise RuntimeError("float8 is not supported on this device\nsecond line")
        return NoCpu(params, lr=lr)

    monkeypatch.setitem(b.CONTESTANTS, "ghost", b.Contestant("ghost", missing, "missing peer"))
    monkeypatch.setitem(b.CONTESTANTS, "no-cpu", b.Contestant("no-cpu", unsupported, "fails"))
    monkeypatch.setitem(b.CONTESTANTS, "gpu-only",
                        b.Contestant("gpu-only", missing, "CUDA peer", cuda_only=True))
    factories, skipped = b.available_contestants(
        "cpu", ["torch-fused", "torch-foreach", "torch-forloop", "gpu-only", "ghost", "no-cpu"])
    assert set(factories) == {"torch-fused", "torch-foreach", "torch-forloop"}
    assert skipped["gpu-only"] == "CUDA only"
    assert "not installed" in skipped["ghost"]
    assert skipped["no-cpu"] == "RuntimeError: float8 is not supported on this device"
    with pytest.raises(ValueError, match="unknown contestant"):
        b.available_contestants("cpu", ["no-such-optimizer"])


def test_default_contestants_include_every_peer():
    for name in ("onepass", "onepass-bf16", "onepass-int8", "torch-fused", "optimi", "bitsandbytes",
                 "bitsandbytes-8bit", "torchao-8bit", "torchao-4bit", "torchao-fp8"):
        assert name in b.DEFAULT_CONTESTANTS
    assert not any(c.cuda_only for n, c in b.CONTESTANTS.items() if n in b.DEFAULT_CONTESTANTS)


def _importable(module: str) -> bool:
    try:
        with b._quiet_import():
            importlib.import_module(module)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("name,module", [("optimi", "optimi"), ("bitsandbytes-8bit", "bitsandbytes")])
def test_peer_probe(name, module):
    """A peer that is installed passes the probe here (the availability probe is the accuracy
    protocol's shapes, two steps); one that is not is skipped with "not installed"."""
    factories, skipped = b.available_contestants("cpu", [name])
    if _importable(module):
        assert name in factories, skipped.get(name)
    else:
        assert "not installed" in skipped[name]


def test_run_benchmark_lists_a_peer_that_cannot_run(monkeypatch):
    def missing(params, lr, wd):
        raise ModuleNotFoundError("No module named 'ghost'")

    monkeypatch.setitem(b.CONTESTANTS, "ghost", b.Contestant("ghost", missing, "missing peer"))
    result = b.run_benchmark(cases=["small"], device="cpu", quick=True, rounds=2,
                             contestants=["torch-fused", "ghost"], accuracy_steps=3, progress=False)
    assert "not installed" in result["skipped"]["ghost"]
    case = result["cases"][0]
    assert "not installed" in case["skipped"]["ghost"] and case["errors"] == {}
    fused = case["contestants"][0]
    assert fused["name"] == "torch-fused" and fused["accuracy"]["steps"] == 3
    assert fused["accuracy"]["rel"] < 1e-5  # torch fused against torch forloop
    text = b.format_table(result)
    assert "ghost skipped: not installed" in text
    json.dumps(result)


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
    assert len(fused["ms_all"]) == 3 == fused["rounds"] and fused["ms"] > 0
    assert fused["x_torch_fused"] == 1.0 and len(fused["warmup_ms"]) == 1
    assert fused["bytes_per_step"] == 28 * 197 and case["ceiling"]["bytes"] == 2 * 4 * 4 * 197
    assert case["ceiling"]["gbps"] > 0
    json.dumps(case)


def test_run_case_budget_gives_fewer_rounds_not_a_drop():
    factories = {"torch-fused": b.make_factory("torch-fused"),
                 "torch-forloop": b.make_factory("torch-forloop")}
    # A budget no step can meet: every contestant gets min_rounds, the ceiling every round.
    case = b.run_case("tiny", [(64, 3)], factories, "cpu", "fp32", rounds=5, warmup=2,
                      budget_s=1e-12, min_rounds=2)
    assert {c["name"]: c["rounds"] for c in case["contestants"]} == {"torch-fused": 2,
                                                                      "torch-forloop": 2}
    assert len(case["ceiling"]["ms_all"]) == 5 and case["skipped"] == {} and case["errors"] == {}
    assert case["budget_s"] == 1e-12 and case["min_rounds"] == 2
    generous = b.run_case("tiny", [(64, 3)], factories, "cpu", "fp32", rounds=4, warmup=1,
                          budget_s=1e6)
    assert [c["rounds"] for c in generous["contestants"]] == [4, 4]


def test_progress_bar_only_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(b.progress_bar(10, "gpt2", None, file=io.StringIO()), b._NoBar)
    assert isinstance(b.progress_bar(10, "gpt2", False, file=Tty()), b._NoBar)
    tqdm = pytest.importorskip("tqdm", reason="tqdm not installed (the bench extra)")
    out = Tty()
    bar = b.progress_bar(10, "gpt2", None, file=out)
    assert isinstance(bar, tqdm.tqdm)
    bar.set_postfix_str("torch-fused")
    bar.update(5)
    bar.refresh()  # tqdm redraws at most every 0.1 s by itself
    bar.close()
    assert "gpt2" in out.getvalue() and "5/10" in out.getvalue() and "torch-fused" in out.getvalue()
