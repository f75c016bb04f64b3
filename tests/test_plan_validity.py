"""The plan's validity rules (csrc/group_plan.h, "What a plan may hold"): a storage moved or
resized in place under a tensor the plan holds makes it stale, never wrong.

Each test makes the same in-place change to an optimizer on a planned backend and to one on the
reference backend, between steps, then steps both: the two must agree bit for bit, or both must
refuse the step with the same error and leave every param and state tensor as it was."""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass import _ops
from onepass.backends import BACKENDS
from onepass.backends.reference import storage_holds

from ._bits import assert_same_bits as assert_same

pytestmark = pytest.mark.skipif(not _ops.HAS_EXT, reason="the plan lives in the compiled extension")

SHAPES = [(5000,), (70, 60), (7,)]
FORMATS = ["fp32", "bf16", "int8"]
PLANNED = [(b, f) for b in ("cpu", "cuda-emu", "triton") for f in FORMATS]


def _opt(backend, fmt="fp32", dtype=torch.float32, **kw):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    kw = dict(dict(lr=1e-2, weight_decay=0.1, state_dtype=fmt, min_int8_numel=16), **kw)
    return ps, onepass.AdamW(ps, backend=backend, **kw)


def _grads(ps, s):
    gen = torch.Generator().manual_seed(100 + s)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def snapshot(ps, opt):
    """Every param and state tensor, by value (what a refused step must leave unchanged)."""
    out = [p.detach().clone() for p in ps]
    for p in ps:
        for k, v in sorted(opt.state.get(p, {}).items()):
            if isinstance(v, torch.Tensor):
                # (one whose storage was shrunk under it cannot be read: its byte count stands in)
                v = v.clone() if storage_holds(v) else v.untyped_storage().nbytes()
            out.append((k, v))
    return out


def assert_unchanged(before, after):
    assert len(before) == len(after)
    for x, y in zip(before, after):
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        if isinstance(x, torch.Tensor):
            assert_same(x, y)
        else:
            assert x == y


def _run(backend, fmt, change, steps=3, at=1):
    """Both optimizers through ``steps`` steps, ``change(ps, opt)`` before step ``at``: the
    params and state after the last step, or the error of the step that raised (with a check
    that it changed nothing)."""
    ps, opt = _opt(backend, fmt)
    for s in range(steps):
        _grads(ps, s)
        if s == at:
            change(ps, opt)
        before = snapshot(ps, opt)
        try:
            opt.step()
        except (RuntimeError, ValueError) as e:
            assert_unchanged(before, snapshot(ps, opt))
            return e
    return snapshot(ps, opt)


def _agree(backend, fmt, change, **kw):
    got, want = _run(backend, fmt, change, **kw), _run("reference", fmt, change, **kw)
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert type(got) is type(want), (got, want)
        return got
    assert_unchanged(want, got)
    return None


# ---- state storage moved in place: the plan must follow it ------------------------------------


def _data_clone(ps, opt):
    # what offload and precision-conversion code does: new storage under the same tensor
    for p in ps:
        for v in opt.state[p].values():
            v.data = v.data.clone()


def _share_memory(ps, opt):
    # the A3C / Hogwild pattern: every state tensor moved to shared memory in place
    for p in ps:
        for v in opt.state[p].values():
            v.share_memory_()


def _step_float64(ps, opt):
    opt.state[ps[0]]["step"].data = opt.state[ps[0]]["step"].data.double()


@pytest.mark.parametrize("backend,fmt", PLANNED)
@pytest.mark.parametrize("change", [_data_clone, _share_memory])
def test_state_storage_moved_in_place_is_followed(backend, fmt, change):
    assert _agree(backend, fmt, change) is None


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu", "triton"])
def test_a_float64_step_count_put_in_by_data_is_read(backend):
    assert _agree(backend, "fp32", _step_float64) is None


def test_a_moved_state_is_followed_while_the_old_memory_is_reused():
    # The freed storage of the old moments is handed out again (same size): a stale plan would
    # write the new tensor's memory. It must stay as it was made.
    ps, opt = _opt("cpu")
    _grads(ps, 0)
    opt.step()
    _data_clone(ps, opt)
    bystanders = [torch.full(p.shape, 7.0) for p in ps for _ in range(2)]
    _grads(ps, 1)
    opt.step()
    for t in bystanders:
        assert torch.equal(t, torch.full(t.shape, 7.0))


# ---- state storage too small or of another kind: refused, nothing written ----------------------


def _other_size(ps, opt):
    opt.state[ps[0]]["exp_avg"].data = torch.zeros(10)


def _other_dtype(ps, opt):
    st = opt.state[ps[0]]["exp_avg_sq"]
    st.data = torch.zeros(st.shape, dtype=torch.float64)


def _set_empty(ps, opt):
    opt.state[ps[1]]["exp_avg"].set_()


def _resize_smaller(ps, opt):
    opt.state[ps[0]]["exp_avg_sq"].resize_(10)


def _storage_shrunk(ps, opt):
    # same shape and strides, storage resized under it: only its byte count tells
    opt.state[ps[1]]["exp_avg"].untyped_storage().resize_(16)


def _step_int64(ps, opt):
    opt.state[ps[2]]["step"].data = opt.state[ps[2]]["step"].data.long()


@pytest.mark.parametrize("backend,fmt", PLANNED)
@pytest.mark.parametrize("change", [_other_size, _other_dtype, _set_empty, _resize_smaller,
                                    _storage_shrunk, _step_int64])
def test_state_too_small_or_of_another_kind_is_refused(backend, fmt, change):
    err = _agree(backend, fmt, change)
    assert isinstance(err, RuntimeError)


# ---- grads whose storage was freed in place (FSDP) ------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu", "triton", "reference"])
@pytest.mark.parametrize("with_state", [False, True])
def test_a_grad_with_freed_storage_is_refused(backend, with_state):
    ps, opt = _opt(backend)
    if with_state:
        _grads(ps, 0)
        opt.step()
    _grads(ps, 1)
    ps[1].grad.untyped_storage().resize_(0)
    before = snapshot(ps, opt)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has 0 bytes of storage, too few for its "
                                           r"shape \[70, 60\]"):
        opt.step()
    assert_unchanged(before, snapshot(ps, opt))


# ---- params that share memory: refused, naming both ------------------------------------------


def _listed_twice(ps, opt):
    opt.param_groups[0]["params"].append(ps[0])


def _tied_by_hand(ps, opt):
    ps[1].data = ps[0].data[:4200].view(70, 60)


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu", "triton"])
@pytest.mark.parametrize("change,words", [
    (_listed_twice, "param 0 of param group 0 is listed again as param 3"),
    (_tied_by_hand, "param 0 of param group 0 shares memory with param 1 of param group 0"),
])
def test_params_sharing_memory_are_refused(backend, change, words):
    err = _agree(backend, "fp32", change)
    assert isinstance(err, ValueError) and words in str(err)


def test_params_sharing_memory_are_named():
    torch.manual_seed(0)
    base = torch.randn(30)
    a = torch.nn.Parameter(base[:20])
    b = torch.nn.Parameter(base[10:])
    c = torch.nn.Parameter(torch.randn(4))
    opt = onepass.AdamW([{"params": [c], "param_names": ["c"]},
                         {"params": [c.new_zeros(1).requires_grad_(), a, b],
                          "param_names": ["x", "enc.w", "dec.w"]}])
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param 1 \('enc.w'\) of param group 1 shares memory "
                                         r"with param 2 \('dec.w'\) of param group 1"):
        opt.step()


def test_params_next_to_each_other_in_one_storage_still_step():
    # slices of one flat buffer (a flat-param layout) touch but do not overlap
    torch.manual_seed(0)
    flat = torch.randn(30)
    a, b = torch.nn.Parameter(flat[:10]), torch.nn.Parameter(flat[10:])
    ra, rb = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    oa, ob = onepass.AdamW([a, b], backend="cpu"), onepass.AdamW([ra, rb], backend="reference")
    for s in range(3):
        for p, q in ((a, ra), (b, rb)):
            p.grad = torch.full_like(p, 0.1 * (s + 1))
            q.grad = p.grad.clone()
        oa.step()
        ob.step()
    assert_same(a, ra)
    assert_same(b, rb)
