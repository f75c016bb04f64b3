"""lr schedulers, Tensor lr and GradScaler driving onepass as they drive torch.optim.
"""
from __future__ import annotations

import math

import pytest
import torch

import onepass

from .optimizer_helpers import (CPU_BACKENDS, assert_params_close, assert_params_equal,
                                assert_state_equal, assert_unchanged, clone_params, make_grads,
                                make_params, set_grads, snapshot)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------------
# lr schedulers and Tensor lr
# ---------------------------------------------------------------------------------------------------

def _schedulers(opt):
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=1e-5)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])


def _chained(opt):
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2, eta_min=1e-5)
    return [warm, cos]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_tensor_settings_filled_in_place_are_read_every_step(backend, state_dtype):
    # A momentum / eps / decay schedule that fills Tensor settings in place: the same objects,
    # new values. Each step must use the values of that step, as floats set anew would.
    shapes = [(70, 80), (9,)]
    op, fp = make_params(shapes), make_params(shapes)
    # (float64: their values are then the floats themselves)
    b1, b2, eps, wd = (torch.tensor(v, dtype=torch.float64) for v in (0.9, 0.99, 1e-8, 0.1))
    ours = onepass.AdamW(op, lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=wd, backend=backend,
                         state_dtype=state_dtype)
    floats = onepass.AdamW(fp, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                           backend=backend, state_dtype=state_dtype)
    schedule = [(0.9, 1e-8, 0.1), (0.9, 1e-8, 0.1), (0.0, 1e-3, 0.5), (0.5, 1e-3, 0.0),
                (0.5, 1e-2, 0.0)]
    for t, (beta1, e, w) in enumerate(schedule):
        b1.fill_(beta1)
        eps.fill_(e)
        wd.fill_(w)
        g = floats.param_groups[0]
        g["betas"], g["eps"], g["weight_decay"] = (beta1, 0.99), e, w
        grads = make_grads(op, t)
        set_grads(op, grads)
        set_grads(fp, grads)
        ours.step()
        floats.step()
        assert_params_equal(op, fp)
    assert_state_equal(ours, floats)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["sequential", "chained"])
def test_lr_schedulers_drive_onepass_like_torch(backend, how):
    op = make_params()
    tp = clone_params(op)
    ours = onepass.AdamW(op, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(tp, lr=1e-2, foreach=False)
    if how == "sequential":
        s_ours, s_theirs = [_schedulers(ours)], [_schedulers(theirs)]
    else:
        s_ours, s_theirs = _chained(ours), _chained(theirs)
    lrs = []
    for t in range(25):
        grads = make_grads(op, t)
        set_grads(op, grads)
        set_grads(tp, grads)
        ours.step()
        theirs.step()
        for s in s_ours + s_theirs:
            s.step()
        lr_o = [g["lr"] for g in ours.param_groups]
        lr_t = [g["lr"] for g in theirs.param_groups]
        assert lr_o == lr_t, f"step {t}: {lr_o} != {lr_t}"
        assert s_ours[-1].get_last_lr() == s_theirs[-1].get_last_lr()
        lrs.append(lr_o[0])
    assert len(set(lrs)) > 10  # the schedule really changed the lr
    assert_params_close(op, tp)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_gives_float_lr_bits(backend, lr_dtype):
    # A float32 torch.tensor(1e-3) holds 0.0010000000474974513, not 1e-3: the float twin uses the
    # value the tensor holds.
    lr_t = torch.tensor(1e-3, dtype=lr_dtype)
    lr_f = float(lr_t)
    if lr_dtype == torch.float64:
        assert lr_f == 1e-3
    p1 = make_params()
    p2 = clone_params(p1)
    o1 = onepass.AdamW(p1, lr=lr_t, weight_decay=0.1, backend=backend)
    o2 = onepass.AdamW(p2, lr=lr_f, weight_decay=0.1, backend=backend)
    for t in range(6):
        grads = make_grads(p1, t)
        set_grads(p1, grads)
        set_grads(p2, grads)
        o1.step()
        o2.step()
        assert_params_equal(p1, p2)
    assert_state_equal(o1, o2)

# ---------------------------------------------------------------------------------------------------
# GradScaler
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_unscales_and_skips_inf_steps(backend):
    scale = 2.0 ** 10
    params = make_params()
    twin = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend)
    plain = onepass.AdamW(twin, lr=1e-2, backend=backend)
    assert getattr(ours, "_step_supports_amp_scaling", False) is True
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    scaler.scale(torch.ones(()))  # initialises the scale

    def scaled_step(t, poison=False):
        grads = make_grads(params, t)
        set_grads(params, [g * scale for g in grads])  # exact: the scale is a power of two
        if poison:
            params[1].grad[0, 1] = math.inf
        scaler.step(ours)
        scaler.update()
        return grads

    for t in range(3):
        grads = scaled_step(t)
        set_grads(twin, grads)
        plain.step()
        assert_params_equal(params, twin)
    assert_state_equal(ours, plain)
    assert scaler.get_scale() == scale
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")

    snap = snapshot(ours)
    scaled_step(3, poison=True)
    assert_unchanged(ours, snap)
    for p in params:
        assert float(ours.state[p]["step"]) == 3
    assert scaler.get_scale() == scale * 0.5

    # a later good step goes on from the untouched state, now with the smaller scale
    scale *= 0.5
    grads = scaled_step(4)
    set_grads(twin, grads)
    plain.step()
    assert_params_equal(params, twin)
    assert_state_equal(ours, plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_with_unscale_and_clipping(backend):
    # The grad-clipping recipe: scaler.unscale_(opt), clip, scaler.step(opt), scaler.update().
    scale = 2.0 ** 8
    params = make_params()
    twin = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend)
    plain = onepass.AdamW(twin, lr=1e-2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones(()))
    for t in range(3):
        grads = make_grads(params, t)
        set_grads(params, [g * scale for g in grads])
        scaler.unscale_(ours)
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)  # unscaled exactly, and only once
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        set_grads(twin, [p.grad for p in params])
        scaler.step(ours)
        scaler.update()
        plain.step()
        assert_params_equal(params, twin)
    set_grads(params, [g * scale for g in make_grads(params, 3)])
    params[0].grad[2] = -math.inf
    scaler.unscale_(ours)
    snap = snapshot(ours)
    scaler.step(ours)
    scaler.update()
    assert_unchanged(ours, snap)
    assert scaler.get_scale() == scale * 0.5
