"""Fast unit tests for onepass.benchmark and ``python -m onepass`` (seconds, CPU only).

They check the case definitions, the byte accounting (tensor-subclass and quantized state
included), the accuracy protocol, the planning of rounds and the arithmetic of the derived figures
on synthetic numbers (no timing is asserted), that a contestant which cannot run is listed with its
reason, plus one ``--quick`` smoke run of the command in a subprocess. Tests that use a peer
(bitsandbytes, torchao) skip when it is not installed. The benchmark itself (real cases, real timings) runs by hand: ``python -m onepass`` or
``pytest bench/ --benchmark-only``.
"""

from __future__ import annotations

import importlib
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


class _Packed(torch.Tensor):
    """A minimal traceable wrapper subclass (as torchao's low-bit state is): uint8 codes plus a
    float32 scale per 4 elements, presenting itself as a float32 tensor."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32,
                                                   device=codes.device)

    def __init__(self, codes, scale):
        self.codes = codes
        self.scale = scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return _Packed(inner["codes"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_state_nbytes_counts_subclass_inner_tensors_and_maps():
    p = torch.nn.Parameter(torch.zeros(64))
    q = torch.nn.Parameter(torch.zeros(64))
    opt = torch.optim.SGD([p, q], lr=0.1)
    packed = _Packed(torch.zeros(64, dtype=torch.uint8), torch.zeros(16))
    assert b.state_nbytes(opt) == 0
    assert [t.dtype for t in b.state_tensors(packed)] == [torch.uint8, torch.float32]
    qmap = torch.zeros(256)  # one map shared by every param's state, as bitsandbytes keeps it
    opt.state[p] = {"exp_avg": packed, "qmap": qmap, "step": torch.tensor(3.0)}
    opt.state[q] = {"state1": torch.zeros(64, dtype=torch.uint8), "absmax1": torch.zeros(1),
                    "qmap1": qmap, "nested": [torch.zeros(2, dtype=torch.float64)], "step": 3}
    # codes 64 + scale 64 + map 1024 (once) + codes 64 + absmax 4 + nested 16
    assert b.state_nbytes(opt) == 64 + 64 + 1024 + 64 + 4 + 16


def test_state_nbytes_bitsandbytes_8bit():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (the bench extra)")
    p = torch.nn.Parameter(torch.randn(16, 512))  # 8192 elements: quantized, 32 blocks of 256
    small = torch.nn.Parameter(torch.randn(7))  # below 4096 elements: fp32 state
    p.grad, small.grad = torch.randn_like(p), torch.randn_like(small)
    opt = bnb.optim.AdamW8bit([p, small], lr=1e-3)
    opt.step()
    blocks = 8192 // 256
    # codes of m and v, their absmax per block, two 256-entry float32 maps; 2 x 7 fp32 for `small`
    expected_quantized = 2 * 8192 + 2 * 4 * blocks + 2 * 256 * 4
    assert b.state_nbytes(opt) == expected_quantized + 2 * 7 * 4


def test_state_nbytes_torchao_subclass():
    pytest.importorskip("torchao", reason="torchao not installed (the bench extra)")
    with b._quiet_import():
        from torchao.optim.subclass_8bit import OptimState8bit
    p = torch.nn.Parameter(torch.zeros(16, 512))
    opt = torch.optim.SGD([p], lr=0.1)  # only its .state is used: no step, so no torch.compile
    m = OptimState8bit.zeros(p.shape, True, 256, p.device)
    v = OptimState8bit.zeros(p.shape, False, 256, p.device)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": m, "exp_avg_sq": v}
    # each: 8192 codes, 32 float32 scales, its own 256-entry float32 map
    assert b.state_nbytes(opt) == 2 * (8192 + 32 * 4 + 256 * 4)


# --- accuracy ---------------------------------------------------------------------------------------

def test_accuracy_grads_span_decades_and_have_zeros():
    shapes = [(8, 1024)]
    steps = list(b.accuracy_grads(shapes, steps=3, decades=4.0, zero_fraction=0.25))
    again = list(b.accuracy_grads(shapes, steps=3, decades=4.0, zero_fraction=0.25))
    assert len(steps) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(steps, again))
    g = steps[0][0]
    assert (g == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert not torch.equal(steps[0][0] == 0, steps[1][0] == 0)  # fresh zeros each step
    block = g.flatten()[:256].abs()
    nz = block[block > 0]
    assert (nz.max() / nz.min()).item() > 1e3  # more than three decades inside one block
    assert g.abs().max() < 10


class _FlushSmallV(torch.optim.AdamW):
    """torch AdamW whose second moment loses what a dynamic 8-bit map would: after each step,
    elements of v below 3.25e-7 of their 256-block's absmax are set to 0 (m is kept)."""

    def step(self, closure=None):
        out = super().step(closure)
        for st in self.state.values():
            v = st["exp_avg_sq"]
            if v.numel() % 256 == 0:
                blocks = v.view(-1, 256)
                blocks.masked_fill_(blocks < 3.25e-7 * blocks.amax(dim=1, keepdim=True), 0.0)
        return out


def test_accuracy_protocol_exposes_v_dequantized_to_zero():
    kw = dict(steps=20, lr=1e-3, weight_decay=1e-2)
    ref = b.accumulated_update(b._reference_factory(1e-3, 1e-2), steps=20)
    same = b.accuracy(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
                      ref, **kw)
    assert same["finite"] and same["rel"] < 1e-5 and same["max_abs"] < 1e-6
    assert same["ref_max"] <= 20 * 1e-3 * 1.01  # Adam moves an element by about lr per step
    bad = b.accuracy(lambda ps: _FlushSmallV(ps, lr=1e-3, weight_decay=1e-2, foreach=False), ref, **kw)
    # lr * m / eps on some elements: far larger than every reference update
    assert bad["finite"] and bad["max_abs"] > 10 * bad["ref_max"] and bad["rel"] > 1
    # Without the zero gradients the same flaw stays hidden: the protocol needs both ingredients.
    ref0 = b.accumulated_update(b._reference_factory(1e-3, 1e-2), steps=20, zero_fraction=0.0)
    hidden = b.accuracy(lambda ps: _FlushSmallV(ps, lr=1e-3, weight_decay=1e-2, foreach=False), ref0,
                        zero_fraction=0.0, **kw)
    assert hidden["max_abs"] < bad["max_abs"] / 10


def test_accuracy_non_finite_and_errors():
    class Nan(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.data.fill_(float("nan"))

    a = b.accuracy(lambda ps: Nan(ps, lr=0.1), steps=2)
    assert a["finite"] is False and a["max_abs"] is None and a["rel"] is None
    json.dumps(a)

    def broken(ps):
        raise RuntimeError("no kernel for this")

    out = b.measure_accuracy({"torch-foreach": b.make_factory("torch-foreach"), "broken": broken},
                             steps=2)
    assert out["broken"] == {"steps": 2, "error": "RuntimeError: no kernel for this"}
    assert out["torch-foreach"]["rel"] < 1e-5


# --- rounds --------------------------------------------------------------------------------------------

def test_plan_rounds():
    assert b.plan_rounds(100.0, 10, 10.0, 3) == 10  # 10 x 0.1 s fits in 10 s
    assert b.plan_rounds(3000.0, 10, 10.0, 3) == 3  # 3 s a step: 3 rounds, the minimum
    assert b.plan_rounds(2000.0, 10, 10.0, 3) == 5
    assert b.plan_rounds(5000.0, 2, 1.0, 3) == 2  # never more than rounds
    assert b.plan_rounds(None, 10, 10.0, 3) == 10 and b.plan_rounds(5000.0, 10, None, 3) == 10
    for planned in range(1, 11):
        taken = [r for r in range(10) if b._takes_part(r, planned, 10)]
        assert len(taken) == planned
        if planned > 1:  # spread over the run, not bunched at the start
            assert taken[-1] >= 10 - 10 // planned


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
    case["contestants"][0].update(rounds=3, warmup_ms=[9000.0, 5.0],
                                  accuracy={"steps": 100, "max_abs": 1.5e-8, "rel": 7e-7,
                                            "finite": True})
    case["contestants"][2].update(accuracy={"steps": 100, "error": "RuntimeError: nope"})
    text = b.format_table([case])
    lines = text.splitlines()
    assert lines[0].split() == ["case", "contestant", "ms/step", "n", "x", "torch-fused", "GB/s", "of",
                                "ceiling", "state", "B/p", "max|Δ-ref|", "rel", "err"]
    row = next(line for line in lines if "onepass" in line)
    assert row.split() == ["synthetic", "onepass", "5.000", "3", "2.00", "20.0", "1.00", "-",
                           "1.5e-08", "7.0e-07"]
    forloop = next(line for line in lines if line.split()[0] == "torch-forloop")
    assert forloop.split() == ["torch-forloop", "40.000", "-", "0.25", "2.5", "0.12", "-", "error",
                               "error"]
    assert any("ceiling mul_" in line and "20.0" in line for line in lines)
    assert "synthetic: optimi skipped: not installed" in text
    assert "synthetic: bitsandbytes ERROR: RuntimeError: boom" in text
    assert "synthetic: torch-forloop accuracy ERROR: RuntimeError: nope" in text
    assert "first step" not in text  # only contestants that compile get the note
    case["contestants"][2].update(name="torchao-8bit", warmup_ms=[71400.0, 3500.0])
    assert ("synthetic: first step, with torch.compile, not timed: torchao-8bit 71.4 s"
            in b.format_table([case]))
    # The full result (with machine info) gets a header; a skip seen in every case is said once.
    result = {"machine": b.machine_info("cpu"),
              "config": {"device": "cpu", "dtype": "fp32", "rounds": 3, "warmup": 1, "quick": True,
                         "budget_s": 10.0, "min_rounds": 3, "accuracy": {"steps": 100}},
              "cases": [case, dict(b.derive(_synthetic_case()), case="other")]}
    full = b.format_table(result)
    assert "torch " + torch.__version__ in full
    assert "\noptimi skipped: not installed" in full
    assert "fewer when its steps would exceed 10 s, at least 3" in full
    assert "over 100 steps against torch.optim.AdamW with fp32 state" in full


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


# --- the command -------------------------------------------------------------------------------------

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
