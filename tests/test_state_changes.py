"""Changes between steps that remake a param's state: a group's state_dtype or param_rounding
changed (the state converted, a Kahan compensation folded into the param) and a param moved to
another memory layout (its moments follow). Every backend gives the reference's bits, and a
step that raises after such a change leaves every param and state tensor as it was."""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass import _ops
from onepass.backends import BACKENDS

from ._bits import assert_same_bits as assert_same
from .test_plan_validity import assert_unchanged, snapshot

BACKENDS_HERE = ["reference", "cpu", "cuda-emu", "triton"]
CHANGES = [  # (constructor settings, what the group is changed to)
    (dict(state_dtype="bf16", param_rounding="kahan"), dict(state_dtype="int8", param_rounding="nearest")),
    (dict(state_dtype="int8"), dict(state_dtype="fp32", param_rounding="kahan")),
    (dict(state_dtype="fp32", param_rounding="kahan"), dict(param_rounding="stochastic")),
]


def _available(backend):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")


def _grads(ps, s):
    gen = torch.Generator().manual_seed(10 + s)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _made(backend, settings, dtype=torch.bfloat16, shapes=((64, 80), (300,))):
    torch.manual_seed(0)
    ps = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    return ps, onepass.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend, min_int8_numel=16,
                             **settings)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("before,after", CHANGES)
def test_a_raising_step_after_a_format_change_changes_nothing(backend, before, after):
    _available(backend)
    ps, opt = _made(backend, before)
    rs, ref = _made("reference", before)
    for s in range(2):
        _grads(ps, s), _grads(rs, s)
        opt.step(), ref.step()
    opt.param_groups[0].update(after)
    ref.param_groups[0].update(after)
    _grads(ps, 2), _grads(rs, 2)
    good = ps[1].grad
    ps[1].grad = good.clone()
    ps[1].grad.untyped_storage().resize_(0)  # a grad whose storage was freed: refused
    was = snapshot(ps, opt)
    with pytest.raises(RuntimeError, match="storage"):
        opt.step()
    # no conversion, no fold into the params: the state keeps its old format and keys
    assert_unchanged(was, snapshot(ps, opt))
    ps[1].grad = good
    for s in range(2, 4):
        if s > 2:
            _grads(ps, s), _grads(rs, s)
        opt.step(), ref.step()
    assert_unchanged(snapshot(rs, ref), snapshot(ps, opt))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_a_param_moved_to_channels_last_keeps_training(backend, fmt):
    # model.to(memory_format=torch.channels_last) after the state exists: param.data is replaced
    # by a tensor of other strides, and the moments must follow it
    _available(backend)
    shapes = ((8, 6, 5, 5), (6,))
    runs = []
    for b in (backend, "reference"):
        ps, opt = _made(b, dict(state_dtype=fmt), dtype=torch.float32, shapes=shapes)
        for s in range(4):
            if s == 2:
                ps[0].data = ps[0].data.to(memory_format=torch.channels_last)
            _grads(ps, s)
            if s >= 2:  # (the grad of a channels_last param is one too, as autograd makes it)
                ps[0].grad = ps[0].grad.to(memory_format=torch.channels_last)
            opt.step()
        runs.append((ps, opt))
    (ps, opt), (rs, ref) = runs
    assert_unchanged(snapshot(rs, ref), snapshot(ps, opt))
    assert ps[0].is_contiguous(memory_format=torch.channels_last)
    if fmt != "int8":  # (int8 codes are kept contiguous, whatever the param's layout)
        assert opt.state[ps[0]]["exp_avg"].stride() == ps[0].stride()


def test_channels_last_moments_follow_the_elements_like_torchs():
    # torch keeps its state (made contiguous) and indexes it logically: the values match torch's
    shapes = ((8, 6, 5, 5),)
    ps, opt = _made("auto", {}, dtype=torch.float32, shapes=shapes)
    tp = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    theirs = torch.optim.AdamW(tp, lr=1e-2, weight_decay=0.1, foreach=False)
    for s in range(4):
        if s == 2:
            ps[0].data = ps[0].data.to(memory_format=torch.channels_last)
            tp[0].data = tp[0].data.to(memory_format=torch.channels_last)
        _grads(ps, s)
        _grads(tp, s)
        opt.step(), theirs.step()
    torch.testing.assert_close(ps[0].detach(), tp[0].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[ps[0]]["exp_avg_sq"], theirs.state[tp[0]]["exp_avg_sq"])
