"""A planned group's kept launches (csrc/cuda/host_step.h, PlannedLaunches), run through the
emulated cuda backend: the descriptor tables and block maps are uploaded once per plan and each
step uploads only its StepEntry table (grad address, which scalars), and only when it changed.
Each test compares with the reference backend bit for bit after every step, through what the
entries must follow: grads written in place (nothing to upload), new grad tensors while the old
ones still hold other values (a stale address would read them), a grad off 16-byte alignment
(the kernel must leave the vector path: the emulation faults on a misaligned vector access), a
transposed grad (a working copy: the unkept path, this step only), and params whose step counts
differ (two scalar entries)."""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

from .._bits import assert_same_bits as assert_same

pytestmark = [pytest.mark.emu, pytest.mark.skipif(
    "cuda-emu" not in BACKENDS,
    reason="the emulated cuda backend is not built (tests/conftest.py builds it unless ONEPASS_EMU=0)")]

# 4096 elements: several blocks (and the vector path); 33x5 and 7: a partial block each
SHAPES = [(4096,), (33, 5), (7,), (300,)]


def _pair(backend, fmt, dtype):
    torch.manual_seed(0)
    a = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=fmt, min_int8_numel=16,
              capturable=backend.endswith("capturable"))
    return a, b, onepass.AdamW(a, backend=backend, **kw), onepass.AdamW(b, backend="reference", **kw)


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _same(a, b, oa, ob):
    for pa, pb in zip(a, b):
        assert_same(pa, pb)
        for k in oa.state[pa]:
            assert_same(oa.state[pa][k], ob.state[pb][k])


def _misaligned(g):
    # the same values at an address 4 bytes past a 16-byte boundary
    buf = torch.empty(g.numel() + 8, dtype=g.dtype)
    off = 1 if buf.data_ptr() % 16 == 0 else 2
    out = buf[off:off + g.numel()].view(g.shape)
    out.copy_(g)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("backend", ["cuda-emu", "cuda-emu-capturable"])
@pytest.mark.parametrize("fmt,dtype", [("fp32", torch.float32), ("fp32", torch.float64),
                                       ("bf16", torch.float32), ("int8", torch.bfloat16)])
def test_kept_launches_follow_every_change_of_the_grads(backend, fmt, dtype):
    a, b, oa, ob = _pair(backend, fmt, dtype)
    held = []  # every grad a step read, alive and then overwritten: a stale entry reads garbage
    for s in range(9):
        g = _grads(s, a)
        if s in (1, 2):
            # in place: the grads keep their addresses (nothing to upload)
            for p, x in zip(a, g):
                p.grad.copy_(x)
        else:
            for i, (p, x) in enumerate(zip(a, g)):
                if s == 4 and i == 0:
                    x = _misaligned(x)
                if s == 6 and i == 1:
                    x = x.t().contiguous().t()  # transposed: a working copy this step
                    assert not x.is_contiguous()
                p.grad = x if s in (4, 6) else x.clone()
        for p, x in zip(b, g):
            p.grad = x.clone()
        oa.step()
        ob.step()
        _same(a, b, oa, ob)
        held.extend(p.grad for p in a)
        for h in held:
            if h.data_ptr() not in {p.grad.data_ptr() for p in a}:
                h.fill_(float("nan"))


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_params_with_different_step_counts_take_their_own_scalars(fmt):
    a, b, oa, ob = _pair("cuda-emu", fmt, torch.float32)
    for s in range(6):
        g = _grads(s, a)
        # param 2 misses steps 1 and 2: from then on its count is two behind the others'
        for i, (pa, pb, x) in enumerate(zip(a, b, g)):
            keep = not (i == 2 and s in (1, 2))
            pa.grad = x.clone() if keep else None
            pb.grad = x.clone() if keep else None
        oa.step()
        ob.step()
        _same(a, b, oa, ob)
    counts = [float(oa.state[p]["step"]) for p in a]
    assert counts == [6.0, 6.0, 4.0, 6.0]
