"""torch.compile: a compiled step gives the bits of an eager step, and traces as one graph.

The cpu backend's kernels are torch custom ops with fake implementations (onepass._ops), so
dynamo puts a whole step in one graph as opaque in-place ops. What is compared is the
optimizer's effect: the "model" here is a sum of elementwise products, whose gradient is the
data itself whatever inductor fuses, so a compiled forward + backward + step + zero_grad must
give exactly the eager bits (a matmul model would not: inductor may reorder its reductions).

What works (torch 2.13, CPU):
- backend "cpu": every state format and param rounding; a step whose state exists is one graph
  with no break (fullgraph=True). The first step creates state eagerly (AdamW._state_lists is
  torch.compiler.disable'd, as torch.optim's _init_group runs eagerly under dynamo): its only
  graph breaks are those calls.
- backend "reference": compiles and gives the same bits, but reads each param's step count on
  the host (float(step)), a graph break per tensor: not fullgraph.
- backend "triton" on CPU tensors under TRITON_INTERPRET=1: dynamo traces into the interpreter's
  numpy code and fails (uint64 fake tensors); not supported. (On a GPU the launcher's host
  tables and step bumps would break the graph too: use the cuda backend under compile.)
- An lr scheduler wraps opt.step in a function of torch/optim/lr_scheduler.py, a file dynamo
  skips: the step then compiles as its own frame (still one graph), one break that torch.optim's
  optimizers get as well.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import onepass

SHAPES = [(24, 40), (40,), (7, 3)]
STEPS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _data(step, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def _opt(params, **kw):
    kw.setdefault("lr", 1e-2)
    # min_int8_numel=0: the 2-dim tensors get int8 state, the 1-dim one keeps fp32, so an int8
    # step has two batches (and the pre-check of a multi-batch step is traced too).
    return onepass.AdamW(params, backend=kw.pop("backend", "cpu"), min_int8_numel=0,
                         weight_decay=0.1, **kw)


def _snapshot(params, opt):
    out = [p.detach().clone() for p in params]
    for p in params:
        for k, v in sorted(opt.state[p].items()):
            out.append(v.detach().clone())
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i} differs"


def _breaks():
    """graph-break reasons recorded by dynamo since the last counters.clear()."""
    return [(k, n) for k, n in counters["graph_break"].items()]


FORMATS = [
    dict(state_dtype="fp32"),
    dict(state_dtype="int8"),
    dict(state_dtype="bf16"),
]


# inductor for fp32 (the real compiler: ~10 s of compiling on 2 cores); aot_eager (the same
# traced graphs, run by torch ops) keeps the other formats within the CI budget
@pytest.mark.parametrize("kw,compiler", [(FORMATS[0], "inductor"), (FORMATS[1], "aot_eager"),
                                         (FORMATS[2], "aot_eager")],
                         ids=lambda x: x["state_dtype"] if isinstance(x, dict) else x)
def test_compiled_train_step_gives_eager_bits(kw, compiler):
    # forward + backward + step + zero_grad in one compiled function, from a fresh optimizer
    # (the first call creates the state), against the same loop in eager
    runs = {}
    for mode in ("eager", "compiled"):
        params = _params()
        opt = _opt(params, **kw)

        def train_step(xs):
            loss = sum((p * x).sum() for p, x in zip(params, xs))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        fn = torch.compile(train_step, backend=compiler) if mode == "compiled" else train_step
        snaps = []
        for s in range(STEPS):
            fn(_data(s))
            snaps.append(_snapshot(params, opt))
        assert all(p.grad is None for p in params)
        assert float(opt.state[params[0]]["step"]) == STEPS
        runs[mode] = snaps
    for s in range(STEPS):
        _assert_same(runs["compiled"][s], runs["eager"][s])


# the options that change what a traced step calls: low-precision formats, bf16 param
# roundings (the random streams and the Kahan buffer), a Tensor lr, amsgrad, coupled decay
STEADY = {
    "fp32": (torch.float32, dict()),
    "int8": (torch.float32, dict(state_dtype="int8")),
    "bf16_state": (torch.float32, dict(state_dtype="bf16")),
    "bf16_stochastic": (torch.bfloat16, dict(param_rounding="stochastic", seed=3)),
    "bf16_kahan": (torch.bfloat16, dict(param_rounding="kahan")),
    "tensor_lr": (torch.float32, dict(lr=torch.tensor(1e-2))),
    "amsgrad_coupled": (torch.float32, dict(amsgrad=True, decoupled=False)),
}


@pytest.mark.parametrize("name", list(STEADY))
def test_step_with_state_is_one_graph_and_eager_bits(name):
    # Once the state exists, opt.step() traces to exactly one graph with no break: fullgraph=True
    # would raise on any break (a .item(), a dict write dynamo cannot follow, an op without a
    # fake). backend="eager": break counts do not depend on the compiler backend, and it skips
    # inductor's compile time.
    dtype, kw = STEADY[name]
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref_kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    a, b = _params(dtype), _params(dtype)
    oa, ob = _opt(a, **kw), _opt(b, **ref_kw)
    for p, g in zip(a + b, _data(0, dtype) * 2):
        p.grad = g.clone()
    # (ob first: when the write counter was global, ob creating its state made oa's cached
    # lists stale and its first compiled step rebuild them, a break; each optimizer counts its
    # own state's writes now, and the order is kept)
    ob.step()
    oa.step()
    counters.clear()
    step = torch.compile(oa.step, fullgraph=True, backend="eager")
    for s in range(1, STEPS + 1):
        for ps in (a, b):
            for p, g in zip(ps, _data(s, dtype)):
                p.grad = g
        step()
        ob.step()
        _assert_same(_snapshot(a, oa), _snapshot(b, ob))
    assert _breaks() == []
    # one graph, compiled once: nothing in a step's Python changes between steps (a recompile
    # each step would mean a guard on something that moves, e.g. the step count)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_first_step_breaks_only_where_state_is_created(fmt):
    # A fresh optimizer's first compiled step creates the state in AdamW._state_lists, which is
    # torch.compiler.disable'd (dict and .tolist() work dynamo cannot trace). Dynamo reports a
    # break for each frame it leaves to call it (3 on torch 2.13: the step wrapper, step,
    # _group_batch) and one for quant.tables' first build of the int8 tables; any other break
    # would be onepass Python that does not trace, so the test accepts no other reason.
    params = _params()
    opt = _opt(params, state_dtype=fmt)
    step = torch.compile(opt.step, backend="eager")
    for p, g in zip(params, _data(0)):
        p.grad = g
    step()
    reasons = _breaks()
    assert reasons, "the first step should leave dynamo to create the state"
    assert all("torch.compiler.disable" in k and ("_state_lists" in k or "_tables" in k)
               for k, _ in reasons), [k.splitlines()[0] for k, _ in reasons]
    counters.clear()
    for s in (1, 2):
        for p, g in zip(params, _data(s)):
            p.grad = g
        step()
    assert _breaks() == []


def test_compiled_step_with_scheduler_and_tensor_lr():
    # torch's documented recipe for compiling an optimizer with a scheduler: a Tensor lr (a
    # changing float would recompile every step), opt.step compiled alone, scheduler eager
    runs = {}
    for mode in ("eager", "compiled"):
        params = _params()
        opt = _opt(params, lr=torch.tensor(1e-2), state_dtype="int8")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        step = torch.compile(opt.step, backend="eager") if mode == "compiled" else opt.step
        for s in range(STEPS + 1):
            for p, g in zip(params, _data(s)):
                p.grad = g
            step()
            sched.step()
        runs[mode] = _snapshot(params, opt)
        # the schedule moved the Tensor lr in place: 1e-2 / (STEPS + 2), in float32
        assert torch.equal(opt.param_groups[0]["lr"], torch.tensor(1e-2 * (1.0 / (STEPS + 2))))
    _assert_same(runs["compiled"], runs["eager"])
    # the scheduler's wrapper lives in a file dynamo skips (torch.optim's optimizers get the
    # same break); everything else is the first step's state creation
    for k, _ in _breaks():
        assert "lr_scheduler.py" in k or "_state_lists" in k or "_tables" in k, k.splitlines()[0]


def test_reference_backend_compiles_with_host_reads():
    # The reference reads each param's step count on the host (float(step)): a graph break per
    # read, so not fullgraph, but the bits are the eager ones.
    a, b = _params(), _params()
    oa, ob = _opt(a, backend="reference"), _opt(b, backend="reference")
    step = torch.compile(oa.step, backend="eager")
    for s in range(STEPS):
        for ps in (a, b):
            for p, g in zip(ps, _data(s)):
                p.grad = g
        step()
        ob.step()
    _assert_same(_snapshot(a, oa), _snapshot(b, ob))
    assert any("item()" in k for k, _ in _breaks())
