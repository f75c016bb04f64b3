"""The CUDA backend: what is particular to it. Bit-exactness for every dtype and option (against
the reference on the CPU) is in test_matrix.py, which picks the cuda backend up on a GPU.

These tests need a GPU and the extension built with its CUDA kernels; elsewhere they skip with
the reason (CI compiles the kernels with scripts/check_cuda_build.sh instead).
"""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

pytestmark = pytest.mark.cuda
_why = BACKENDS["cuda"].unavailable_reason(torch.device("cuda"))
if not torch.cuda.is_available():
    _why = "no CUDA GPU here"
if _why is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"cuda backend unavailable: {_why}")]


def _params(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(257, 31), (4096,), (1,), (0,), (8 * 333 + 5,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(p.device) for p in params]


def _snapshot(params, opt):
    out = [p.detach().cpu().clone() for p in params]
    for p in params:
        out += [opt.state[p][k].cpu().clone() for k in ("exp_avg", "exp_avg_sq")]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_capturable_gives_the_same_bits(dtype):
    a, b, r = _params("cuda", dtype), _params("cuda", dtype), _params("cpu", dtype)
    oa = onepass.AdamW(a, lr=1e-2, backend="cuda")
    ob = onepass.AdamW(b, lr=torch.tensor(1e-2, device="cuda"), backend="cuda", capturable=True)
    orf = onepass.AdamW(r, lr=torch.tensor(1e-2), backend="reference")
    for s in range(3):
        for ps in (a, b, r):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
        oa.step()
        ob.step()
        orf.step()
    assert ob.state[b[0]]["step"].is_cuda and float(ob.state[b[0]]["step"]) == 3.0
    got_b, want = _snapshot(b, ob), _snapshot(r, orf)
    assert all(torch.equal(x, y) for x, y in zip(got_b, want))
    # the non-capturable run (float lr) moved the params too
    assert not torch.equal(a[0].detach().cpu(), _params("cpu", dtype)[0].detach())


def test_cuda_graph_replay_with_a_scheduled_tensor_lr():
    params = _params("cuda")
    lr = torch.tensor(1e-2, device="cuda")
    opt = onepass.AdamW(params, lr=lr, backend="cuda", capturable=True)
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    eager = _params("cuda")
    eopt = onepass.AdamW(eager, lr=torch.tensor(1e-2, device="cuda"), backend="cuda", capturable=True)
    # warm up on a side stream (as torch requires before capture), then capture one step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for p, g in zip(params, _grads(params, 0)):
            p.grad.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    for p, g in zip(eager, _grads(eager, 0)):
        p.grad = g
    eopt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(1, 4):
        new_lr = 1e-2 * (0.5 ** step)
        lr.fill_(new_lr)
        eopt.param_groups[0]["lr"].fill_(new_lr)
        for p, g in zip(params, _grads(params, step)):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager, _grads(eager, step)):
            p.grad = g
        eopt.step()
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(_snapshot(params, opt), _snapshot(eager, eopt)))
    assert float(opt.state[params[0]]["step"]) == 4.0


def test_same_bits_as_the_cpu_kernel():
    if "cpu" not in onepass.available_backends("cpu"):
        pytest.skip("the CPU kernel is not built")
    g_, c_ = _params("cuda", torch.bfloat16), _params("cpu", torch.bfloat16)
    og = onepass.AdamW(g_, lr=1e-2, backend="cuda", amsgrad=True)
    oc = onepass.AdamW(c_, lr=1e-2, backend="cpu", amsgrad=True)
    for s in range(3):
        for ps in (g_, c_):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
        og.step()
        oc.step()
    assert all(torch.equal(x, y) for x, y in zip(_snapshot(g_, og), _snapshot(c_, oc)))


@pytest.mark.slow
def test_tensor_over_2_31_elements():
    n = (1 << 31) + 77
    if torch.cuda.get_device_properties(0).total_memory < 6 * 4 * n:
        pytest.skip("needs ~52 GB of GPU memory")
    p = torch.nn.Parameter(torch.full((n,), 0.5, device="cuda"))
    p.grad = torch.full_like(p, 0.25)
    p.grad[-1] = -1.0
    opt = onepass.AdamW([p], lr=1e-2, backend="cuda")
    opt.step()
    # the first step moves each weight by ~lr * sign(g), decayed: the last element went the other way
    first, last = float(p[0]), float(p[-1])
    assert first < 0.5 and last > 0.5
    assert float(opt.state[p]["exp_avg"][-1]) == pytest.approx(-0.1)
