"""Step counts past 2**24: a float32 count stops there on every backend, as torch's float32 step
does (16777216 + 1 rounds back to 16777216), so training goes on; float64 counts go on counting;
and a checkpoint of any whole count torch can load loads."""
from __future__ import annotations

import copy

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

from ._bits import assert_same_bits as assert_same
from .optimizer_helpers import assert_params_close, clone_params, make_params, run_steps

BACKENDS_HERE = ["reference", "cpu", "cuda-emu", "cuda-emu-capturable", "triton"]
LAST = 2**24  # the last float32 count


def _at(opt, params, count, dtype=torch.float32):
    for p in params:
        opt.state[p]["step"] = torch.tensor(float(count), dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_float32_counts_stop_at_2_24_like_torchs(backend, fmt):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    shapes = [(70, 80), (9,)]
    # (a float64 param: its scalars are float64, where one count in 2**24 shows in the bits)
    ours_p, ref_p = ([*make_params(shapes), *make_params([(33,)], dtype=torch.float64)]
                     for _ in range(2))
    # betas this close to 1 leave beta**(2**24) ~ 0.19: the bias corrections depend on the count
    kw = dict(lr=1e-2, betas=(1 - 1e-7, 1 - 1e-7), state_dtype=fmt)
    ours = onepass.AdamW(ours_p, backend=backend, **kw)
    ref = onepass.AdamW(ref_p, backend="reference", **kw)
    for opt, ps in ((ours, ours_p), (ref, ref_p)):
        run_steps(opt, ps, 1)
        _at(opt, ps, LAST - 2)
    for t in range(1, 5):  # counts 2**24 - 1, 2**24, and 2**24 twice more
        run_steps(ours, ours_p, 1, start=t)
        run_steps(ref, ref_p, 1, start=t)
        for p, q in zip(ours_p, ref_p):
            assert_same(p.detach(), q.detach())
            assert float(ours.state[p]["step"]) == min(LAST - 2 + t, LAST)
            for k, v in ref.state[q].items():
                assert_same(ours.state[p][k], v)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_past_2_24_against_torch_and_float64_counts(backend):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    op = make_params()
    tp = clone_params(op)
    ours = onepass.AdamW(op, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(tp, lr=1e-2, foreach=False)
    for opt, ps in ((ours, op), (theirs, tp)):
        run_steps(opt, ps, 1)
        _at(opt, ps, LAST - 1)
        run_steps(opt, ps, 3, start=1)
    assert_params_close(op, tp)
    assert [float(ours.state[p]["step"]) for p in op] == [float(theirs.state[q]["step"]) for q in tp]
    if backend.endswith("capturable"):
        return  # (device counts, which a CUDA graph advances, are float32 only: refused there)
    # float64 counts (torch makes them under a float64 default dtype) count on past 2**24
    _at(ours, op, LAST, torch.float64)
    run_steps(ours, op, 2, start=4)
    assert [float(ours.state[p]["step"]) for p in op] == [LAST + 2.0] * len(op)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_checkpoint_past_2_24_loads_and_steps(backend):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    tp = make_params()
    theirs = torch.optim.AdamW(tp, lr=1e-2, foreach=False)
    run_steps(theirs, tp, 1)
    sd = copy.deepcopy(theirs.state_dict())
    for st in sd["state"].values():
        st["step"] = torch.tensor(float(LAST + 4), dtype=torch.float64)  # torch loads it
    theirs.load_state_dict(copy.deepcopy(sd))
    ours = onepass.AdamW(clone_params(tp), lr=1e-2, backend=backend)
    ours.load_state_dict(sd)
    run_steps(ours, ours.param_groups[0]["params"], 1, start=1)
    # (onepass loads a count as float32, the dtype torch's optimizers make, and adds 1 there)
    want = float(torch.tensor(float(LAST + 4)) + 1)
    assert [float(st["step"]) for st in ours.state.values()] == [want] * len(ours.state)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda-emu", "triton"])
def test_counts_no_step_can_advance_are_refused_alike(backend):
    if backend not in BACKENDS:
        pytest.skip(f"the {backend} backend is not available here")
    ps = make_params()
    opt = onepass.AdamW(ps, lr=1e-2, backend=backend)
    run_steps(opt, ps, 1)
    for bad in (1.5, -1.0, 2.0**53 + 2):
        _at(opt, ps, bad, torch.float64)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(RuntimeError, match=r"steps\[0\] holds .*not a whole number in \[0, 2\*\*53\]"):
            run_steps(opt, ps, 1, start=1)
        for p, q in zip(ps, before):
            assert_same(p.detach(), q)
