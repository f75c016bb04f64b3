"""The optimizer's cached plan (csrc/group_plan.h, onepass._plan): a step whose group is
unchanged takes its tensors from C++ and reads the grads there. Every test compares the planned
optimizer with the reference backend, bit for bit after every step, through the changes a plan
must notice (new grads, a param losing its grad, new storage, a new param list, a transposed
grad, changed settings) and those it must refuse (a step count out of range)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import onepass
from onepass import _ops
from onepass.backends import BACKENDS

from ._bits import assert_same_bits as assert_same

pytestmark = pytest.mark.skipif(not _ops.HAS_EXT, reason="the plan lives in the compiled extension")

SHAPES = [(7,), (33, 5), (4096,), (3, 1, 2)]
FORMATS = ["fp32", "bf16", "int8"]


def _pair(fmt="fp32", backend="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    a = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=fmt, min_int8_numel=16, **kw)
    return a, b, onepass.AdamW(a, backend=backend, **kw), onepass.AdamW(b, backend="reference", **kw)


def _grads(step, params, skip=()):
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        out.append(None if i in skip else g)
    return out


def _set(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def _same(a, b, oa, ob):
    for pa, pb in zip(a, b):
        assert_same(pa, pb)
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert set(sa) == set(sb)
        for k in sa:
            assert_same(sa[k], sb[k])


def _step(a, b, oa, ob, s, skip=(), grads=None, after=()):
    """Step s of both optimizers on the same grads (``skip``: params left without one), then
    ``after`` (e.g. schedulers), then the bit-for-bit comparison."""
    g = _grads(s, a, skip) if grads is None else grads
    _set(a, g)
    _set(b, g)
    oa.step()
    ob.step()
    for x in after:
        x.step()
    _same(a, b, oa, ob)


def _plan(opt):
    cache = opt._batch_cache.get(id(opt.param_groups[0]))
    return None if cache is None else cache.plan


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_plan_is_made_and_kept(fmt):
    a, b, oa, ob = _pair(fmt)
    plans = []
    for s in range(4):
        _step(a, b, oa, ob, s)
        plans.append(_plan(oa))
    # the same plan every step (the reference optimizer's state writes are its own)
    assert plans[0] is not None
    assert all(p is plans[0] for p in plans)
    batches = oa._batch_cache[id(oa.param_groups[0])].batches
    assert batches is not None and all(bk.name == "cpu" for bk, _ in batches)


@pytest.mark.parametrize("fmt", FORMATS)
def test_changes_the_plan_must_notice(fmt):
    a, b, oa, ob = _pair(fmt)
    _step(a, b, oa, ob, 0)
    _step(a, b, oa, ob, 1)
    _step(a, b, oa, ob, 2, skip={1})  # a param without a grad: not updated, plan made anew
    _step(a, b, oa, ob, 3)            # and with it again
    # new storage for a param (as p.data = ... or .to() gives): a stale plan would update the old
    for pa, pb in ((a[2], b[2]), (a[0], b[0])):
        pa.data = pa.data.clone()
        pb.data = pb.data.clone()
    _step(a, b, oa, ob, 4)
    # a transposed grad: the walk copies it into the param's layout, this step only
    g = _grads(5, a)
    g[1] = g[1].t().contiguous().t()
    assert not g[1].is_contiguous()
    _step(a, b, oa, ob, 5, grads=g)
    _step(a, b, oa, ob, 6)
    # the settings change between steps: maximize, decay, betas, lr
    for opt in (oa, ob):
        opt.param_groups[0].update(maximize=True, weight_decay=0.3, betas=(0.8, 0.95), lr=3e-3)
    _step(a, b, oa, ob, 7)
    _step(a, b, oa, ob, 8)


# (the triton backend takes int8 state only for contiguous params: its own check, elsewhere)
@pytest.mark.parametrize("backend,fmt", [(b, f) for b in ("cpu", "cuda-emu", "triton")
                                         for f in FORMATS if (b, f) != ("triton", "int8")])
def test_metadata_changed_in_place_leaves_the_fast_path(backend, fmt):
    # The plan's gather passes a step's grads unchecked when every grad is contiguous, of its
    # param's dtype and shape, and every param contiguous (PlanPart::grads_fit). Each change
    # below keeps the storage and shape the plan compares, and must take the checked way: a
    # square param transposed in place, a grad strided in place, a grad given a wrong dtype.
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    torch.manual_seed(0)
    shapes = [(8, 8), (5, 3), (4096,)]
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=fmt, min_int8_numel=16)
    oa = onepass.AdamW(a, backend=backend, **kw)
    ob = onepass.AdamW(b, backend="reference", **kw)
    _step(a, b, oa, ob, 0)
    _step(a, b, oa, ob, 1)
    plan = _plan(oa)
    assert plan is not None
    # a grad strided in place (same storage and shape, transposed strides)
    g = _grads(2, a)
    _set(a, g)
    _set(b, g)
    for p in (a[0], b[0]):
        p.grad.set_(p.grad.t().contiguous().untyped_storage(), 0, (8, 8), (1, 8))
    assert not a[0].grad.is_contiguous()
    oa.step()
    ob.step()
    _same(a, b, oa, ob)
    # a grad of the wrong dtype, past torch's own assignment check: refused, nothing written
    _set(a, _grads(3, a))
    a[1].grad.data = a[1].grad.data.double()
    before = [p.detach().clone() for p in a]
    with pytest.raises(RuntimeError, match="Double|float64"):
        oa.step()
    for p, q in zip(a, before):
        assert torch.equal(p, q)
    _step(a, b, oa, ob, 3)
    # a square param transposed in place (storage and shape unchanged): its state is in the
    # layout of then, which the walk by storage order would pair with the wrong elements
    with torch.no_grad():
        a[0].t_()
        b[0].t_()
    assert not a[0].is_contiguous()
    # int8 state is row-major whatever the param's layout, and so is the triton backend's walk
    # of a param that is not (a working copy of it); fp32 and bf16 moments are moved to the
    # param's new layout (state_lists: _follow_layout), keeping each element's value as the
    # reference (and torch) pair them: the same elements as the reference on every backend
    _step(a, b, oa, ob, 4)
    _step(a, b, oa, ob, 5)
    if fmt != "int8":
        assert oa.state[a[0]]["exp_avg"].stride() == a[0].stride()


def test_new_grads_every_step_and_their_memory_is_let_go():
    a, b, oa, ob = _pair()
    refs = []
    for s in range(3):
        g = _grads(s, a)
        _set(b, g)
        for p, x in zip(a, g):
            p.grad = x  # (not a clone: the weak reference below is to the grad the step reads)
        refs.append(weakref.ref(a[0].grad))
        del g, x
        oa.step()
        ob.step()
        _same(a, b, oa, ob)
        oa.zero_grad(set_to_none=True)
    gc.collect()
    # zero_grad(set_to_none=True) frees the grads: the plan keeps no reference after a step
    assert all(r() is None for r in refs)


def test_a_long_group_read_ahead_pairs_every_grad_with_its_param():
    # gather reads each param's grad a few positions before it checks the param (its prefetch
    # pipeline, PyGroupPlan::ahead): in a group much longer than that distance, of params that all
    # look alike, a grad paired with a neighbour's param would pass every check and change the
    # bits. The changes sit at the group's start, middle and end: a grad missing, a grad replaced
    # by a new tensor, a param given new storage, the list's last element swapped for a stranger.
    torch.manual_seed(0)
    n = 41
    a = [torch.randn(6, requires_grad=True) for _ in range(n)]
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, weight_decay=0.1)
    oa = onepass.AdamW(a, backend="cpu", **kw)
    ob = onepass.AdamW(b, backend="reference", **kw)
    for s in range(3):
        _step(a, b, oa, ob, s)
    first = _plan(oa)
    assert first is not None
    _step(a, b, oa, ob, 3, skip={0, 20, n - 1})
    _step(a, b, oa, ob, 4, skip={21})
    _step(a, b, oa, ob, 5)
    for i in (0, 19, n - 1):
        a[i].data = a[i].data.clone()
        b[i].data = b[i].data.clone()
    _step(a, b, oa, ob, 6)
    _step(a, b, oa, ob, 7)
    assert _plan(oa) is not first
    plan = _plan(oa)
    params = oa.param_groups[0]["params"]
    assert plan.gather(params)
    plan.release()
    stranger = torch.randn(6, requires_grad=True)
    stranger.grad = torch.randn(6)
    assert not plan.gather(params[:-1] + [stranger])
    assert not plan.gather(params[:20] + [stranger] + params[21:])


def test_a_new_param_list_makes_a_new_plan():
    a, b, oa, ob = _pair()
    for s in range(2):
        _step(a, b, oa, ob, s)
    first = _plan(oa)
    extra_a = torch.randn(5, requires_grad=True)
    extra_b = extra_a.detach().clone().requires_grad_()
    oa.param_groups[0]["params"].append(extra_a)
    ob.param_groups[0]["params"].append(extra_b)
    a.append(extra_a)
    b.append(extra_b)
    for s in range(2, 4):
        _step(a, b, oa, ob, s)
    assert _plan(oa) is not first


def test_a_scheduled_lr_reaches_every_planned_step():
    a, b, oa, ob = _pair()
    sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 1.0 / (1 + s))
    for s in range(4):
        _step(a, b, oa, ob, s, after=(sa, sb))


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu"])
def test_a_count_out_of_range_is_refused_and_changes_nothing(backend):
    if backend not in BACKENDS:
        pytest.skip("the emulated cuda backend is not built (tests/conftest.py builds it unless ONEPASS_EMU=0)")
    a, b, oa, ob = _pair(backend=backend)
    for s in range(2):
        g = _grads(s, a)
        _set(a, g)
        oa.step()
    # written in place, so no state write is seen: the planned step still checks every count
    oa.state[a[3]]["step"].fill_(1.5)  # (2**24 is a count: a float32 one stops there)
    before = [p.detach().clone() for p in a]
    with pytest.raises(RuntimeError, match=r"steps\[3\] holds"):
        oa.step()
    for p, q in zip(a, before):
        assert torch.equal(p, q)
    assert oa.state[a[0]]["step"].item() == 2


def test_a_plan_refuses_a_list_that_is_not_its_own():
    a, _, oa, _ = _pair()
    _set(a, _grads(0, a))
    oa.step()
    plan = _plan(oa)
    params = oa.param_groups[0]["params"]
    assert plan.gather(params)
    assert not plan.gather(list(reversed(params)))
    assert not plan.gather(params[:-1])
    assert not plan.gather(tuple(params))
    plan.release()


def test_a_module_of_another_plan_layout_refuses_the_plan():
    # The CUDA and emulated modules reach a plan by its address; its first word says which
    # layout of csrc/group_plan.h built it, and a module of another one raises instead of
    # misreading it (here: a buffer of zeros where a plan should be).
    from onepass.backends import BACKENDS, cuda_emu

    if "cuda-emu" not in BACKENDS:
        pytest.skip("the emulated cuda backend is not enabled (ONEPASS_EMU=0)")
    fake = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="different versions of csrc/group_plan.h"):
        cuda_emu.build().step_plan(
            fake.data_ptr(), 0, lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.0, maximize=False, decoupled=True, grad_scale=None, found_inf=None,
            seed=0, device_steps=False, capturing=False, check_only=False, stub_launch=False)
