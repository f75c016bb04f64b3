"""CUDA graphs: opt.step() captured once in a torch.cuda.CUDAGraph and replayed while a
torch.optim.lr_scheduler moves a Tensor lr gives the bits of eager steps (on the GPU and with the
reference on the CPU).

capturable=True keeps each param's step count on the device and the cuda backend reads the
count, the lr tensor and (under AMP) found_inf on the device, so a replay advances the bias
corrections and sees the schedule's lr with no host work. The scheduler writes the new lr into
the same tensor (fill_), which the captured kernel reads at each replay.

Needs a CUDA GPU and the cuda backend; elsewhere every test skips with the reason.
"""
from __future__ import annotations

import math

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    _why = "no CUDA GPU here (torch.cuda.is_available() is False)"
else:
    _why = BACKENDS["cuda"].unavailable_reason(torch.device("cuda"))
    _why = None if _why is None else f"cuda backend unavailable: {_why}"
if _why is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=_why)]

SHAPES = [(257, 31), (64, 4096), (4096,), (1,), (8 * 333 + 5,)]
REPLAYS = 6
LR = 1e-2


def _params(device, dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in SHAPES]


def _grads(step, dtype, device):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen).to(dtype).to(device) for s in SHAPES]


def _snapshot(params, opt):
    """Params and every state tensor on the CPU; step counts as numbers (capturable keeps them on
    the GPU as float32, the CPU optimizer as its own dtype)."""
    out = [p.detach().cpu() for p in params]
    for p in params:
        for k, v in sorted(opt.state[p].items()):
            out.append(float(v) if k == "step" else v.detach().cpu())
    return out


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        if isinstance(x, float):
            assert x == y, f"step count {i}: {x} != {y}"
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), f"tensor {i} differs"


def _schedule(opt):
    # cosine decay over the run, with a short linear warm-up: the lr changes at every replay
    def factor(s):
        if s < 2:
            return (s + 1) / 2
        return 0.5 * (1 + math.cos(math.pi * s / (REPLAYS + 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


CASES = {
    "fp32": (torch.float32, dict()),
    "bf16_state": (torch.float32, dict(state_dtype="bf16")),
    "int8": (torch.float32, dict(state_dtype="int8")),
    "bf16_params_stochastic": (torch.bfloat16, dict(param_rounding="stochastic", seed=7)),
    "bf16_params_kahan": (torch.bfloat16, dict(param_rounding="kahan")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_replay_with_scheduler_equals_eager(case):
    dtype, kw = CASES[case]
    common = dict(weight_decay=0.1, **kw)

    # the graphed run: static grads, a device lr tensor the scheduler writes in place
    params = _params("cuda", dtype)
    opt = onepass.AdamW(params, lr=torch.tensor(LR, device="cuda"), backend="cuda",
                        capturable=True, **common)
    sched = _schedule(opt)
    for p in params:
        p.grad = torch.zeros_like(p)
    # eager twins: the same capturable optimizer stepped eagerly, and the CPU reference
    eager = _params("cuda", dtype)
    eopt = onepass.AdamW(eager, lr=torch.tensor(LR, device="cuda"), backend="cuda",
                         capturable=True, **common)
    esched = _schedule(eopt)
    ref = _params("cpu", dtype)
    ropt = onepass.AdamW(ref, lr=torch.tensor(LR), backend="reference", **common)
    rsched = _schedule(ropt)

    def eager_steps(step):
        for ps, o, s, dev in ((eager, eopt, esched, "cuda"), (ref, ropt, rsched, "cpu")):
            for p, g in zip(ps, _grads(step, dtype, dev)):
                p.grad = g
            o.step()
            s.step()

    # step 0 eagerly, on a side stream (torch's rule before capture): it creates the state,
    # so the captured step allocates nothing
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, g in zip(params, _grads(0, dtype, "cuda")):
            p.grad.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    sched.step()
    eager_steps(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()  # recorded, not run: the step counts stay at 1 until a replay

    for step in range(1, REPLAYS + 1):
        for p, g in zip(params, _grads(step, dtype, "cuda")):
            p.grad.copy_(g)
        graph.replay()
        sched.step()
        eager_steps(step)
        torch.cuda.synchronize()
        # the schedule really moved the lr, and the graphed lr tensor followed it
        assert float(opt.param_groups[0]["lr"]) == float(ropt.param_groups[0]["lr"])
        got = _snapshot(params, opt)
        _assert_same(got, _snapshot(eager, eopt))
        _assert_same(got, _snapshot(ref, ropt))
    assert float(opt.state[params[0]]["step"]) == REPLAYS + 1
    assert float(opt.param_groups[0]["lr"]) < 0.5 * LR  # the cosine part of the schedule ran


def test_graph_replay_with_grad_scaler_skips_overflow_steps():
    # torch.amp.GradScaler hands the kernel found_inf and the scale as device tensors: a captured
    # step reads them at replay, so an overflowing replay changes nothing (not even the count).
    # The scaler's own bookkeeping (unscale_, update) runs outside the graph.
    params, eager = _params("cuda", torch.float32), _params("cuda", torch.float32)
    opt = onepass.AdamW(params, lr=torch.tensor(LR, device="cuda"), backend="cuda", capturable=True)
    eopt = onepass.AdamW(eager, lr=torch.tensor(LR, device="cuda"), backend="cuda", capturable=True)
    scale = torch.full((), 1024.0, device="cuda")
    found_inf = torch.zeros((), device="cuda")
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.grad_scale, opt.found_inf = scale, found_inf  # what GradScaler.step sets
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, g in zip(params, _grads(0, torch.float32, "cuda")):
            p.grad.copy_(g * 1024)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    eopt.grad_scale, eopt.found_inf = scale.clone(), found_inf.clone()
    for p, g in zip(eager, _grads(0, torch.float32, "cuda")):
        p.grad = g * 1024
    eopt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step, inf in ((1, 0.0), (2, 1.0), (3, 0.0)):
        found_inf.fill_(inf)
        eopt.found_inf.fill_(inf)
        for p, g in zip(params, _grads(step, torch.float32, "cuda")):
            p.grad.copy_(g * 1024)
        graph.replay()
        for p, g in zip(eager, _grads(step, torch.float32, "cuda")):
            p.grad = g * 1024
        eopt.step()
    torch.cuda.synchronize()
    _assert_same(_snapshot(params, opt), _snapshot(eager, eopt))
    assert float(opt.state[params[0]]["step"]) == 3  # steps 0, 1 and 3; 2 overflowed
