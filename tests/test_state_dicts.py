"""State dicts: onepass and torch.optim.Adam(W) state dicts load in both directions, resume
bit-identically, and a bad one raises and changes nothing.
"""
from __future__ import annotations

import copy

import pytest
import torch

import onepass

from .optimizer_helpers import (CPU_BACKENDS, assert_params_close, assert_params_equal,
                                assert_state_equal, assert_unchanged, clone_params, make_params,
                                run_steps, save_load, snapshot)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_load_torch_adamw_state_dict_and_continue(backend, amsgrad):
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
    base = make_params()
    tp = clone_params(base)
    theirs = torch.optim.AdamW(tp, foreach=False, **kw)
    run_steps(theirs, tp, 7)
    op = clone_params(tp)
    ours = onepass.AdamW(op, backend=backend, **kw)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for p, q in zip(op, tp):
        for k, v in theirs.state[q].items():
            assert torch.equal(ours.state[p][k], v), k
    run_steps(theirs, tp, 20, start=7)
    run_steps(ours, op, 20, start=7)
    assert_params_close(op, tp)
    for p in op:
        assert float(ours.state[p]["step"]) == 27


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_onepass_state_dict_loads_into_torch_adamw(backend, amsgrad):
    kw = dict(lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
    op = make_params()
    ours = onepass.AdamW(op, backend=backend, **kw)
    run_steps(ours, op, 7)
    tp = clone_params(op)
    theirs = torch.optim.AdamW(tp, foreach=False, **kw)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    for p, q in zip(op, tp):
        for k, v in ours.state[p].items():
            assert torch.equal(theirs.state[q][k], v), k
    run_steps(theirs, tp, 20, start=7)
    run_steps(ours, op, 20, start=7)
    assert_params_close(op, tp)
    for q in tp:
        assert float(theirs.state[q]["step"]) == 27


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_keys_and_step_tensor_like_torch(backend, amsgrad):
    op = make_params()
    ours = onepass.AdamW(op, amsgrad=amsgrad, backend=backend)
    tp = clone_params(op)
    theirs = torch.optim.AdamW(tp, amsgrad=amsgrad, foreach=False)
    run_steps(ours, op, 2)
    run_steps(theirs, tp, 2)
    expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert set(sd_ours["state"]) == set(sd_theirs["state"])
    for pid in sd_ours["state"]:
        st, ref = sd_ours["state"][pid], sd_theirs["state"][pid]
        assert set(st) == set(ref) == expected
        assert isinstance(st["step"], torch.Tensor)
        assert st["step"].dim() == 0 and st["step"].dtype == torch.float32 == ref["step"].dtype
        assert st["step"].device == ref["step"].device
        assert float(st["step"]) == 2.0
    for p in op:
        assert set(ours.state[p]) == expected
        assert ours.state[p]["step"].dim() == 0 and ours.state[p]["step"].dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_params_keep_fp32_moments_through_save_load(backend):
    params = make_params(dtype=torch.bfloat16)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend)
    run_steps(ours, params, 5)
    for p in params:
        assert p.dtype == torch.bfloat16
        for k in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][k].dtype == torch.float32, k
    # the moments hold values that bf16 cannot represent (so rounding on load would show)
    assert any(not torch.equal(ours.state[p]["exp_avg"], ours.state[p]["exp_avg"].bfloat16().float())
               for p in params)
    loaded = save_load(ours.state_dict())
    q = clone_params(params)
    fresh = onepass.AdamW(q, lr=1e-2, backend=backend)
    fresh.load_state_dict(loaded)
    for p, pq in zip(params, q):
        for k in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[pq][k].dtype == torch.float32
            assert torch.equal(fresh.state[pq][k], ours.state[p][k]), k
        assert torch.equal(fresh.state[pq]["step"], ours.state[p]["step"])
    # and both continue with the same bits
    run_steps(ours, params, 3, start=5)
    run_steps(fresh, q, 3, start=5)
    assert_params_equal(params, q)
    assert_state_equal(ours, fresh)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_state_dict_resume_is_bit_identical(backend, amsgrad, dtype):
    base = make_params(dtype=dtype)
    p1, p2 = clone_params(base), clone_params(base)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.2}]  # noqa: E731
    full = onepass.AdamW(groups(p1), lr=1e-2, amsgrad=amsgrad, backend=backend)
    first = onepass.AdamW(groups(p2), lr=1e-2, amsgrad=amsgrad, backend=backend)
    run_steps(full, p1, 4)
    run_steps(first, p2, 4)
    saved = save_load(first.state_dict())
    del first
    resumed_params = clone_params(p2)
    resumed = onepass.AdamW(groups(resumed_params), lr=1e-2, amsgrad=amsgrad, backend=backend)
    resumed.load_state_dict(saved)
    run_steps(full, p1, 5, start=4)
    run_steps(resumed, resumed_params, 5, start=4)
    assert_params_equal(p1, resumed_params)
    assert_state_equal(full, resumed)
    assert [g["lr"] for g in resumed.param_groups] == [1e-2, 3e-3]

def _bad_state_dicts():
    """name -> a function that spoils a state dict in place."""

    def shape(sd):
        sd["state"][1]["exp_avg"] = torch.zeros(3, 5)

    def unknown_key(sd):
        sd["state"][1]["momentum_buffer"] = torch.zeros(5, 3)

    def missing_key(sd):
        del sd["state"][1]["exp_avg_sq"]

    def missing_max_sq(sd):  # amsgrad is on in the saved group, the state lacks its buffer
        sd["param_groups"][1]["amsgrad"] = True

    def few_groups(sd):
        del sd["param_groups"][1]

    def many_groups(sd):
        sd["param_groups"].append(dict(sd["param_groups"][1], params=[]))

    def few_params(sd):
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]

    def many_params(sd):
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"] + [99]

    def unlisted_param(sd):
        sd["state"][99] = dict(sd["state"][1])

    def step_fraction(sd):
        sd["state"][1]["step"] = torch.tensor(2.5)

    def step_negative(sd):
        sd["state"][1]["step"] = torch.tensor(-1.0)

    def step_not_number(sd):
        sd["state"][1]["step"] = "two"

    def moment_not_float(sd):
        sd["state"][1]["exp_avg"] = torch.zeros(5, 3, dtype=torch.int64)

    def group_bad_lr(sd):
        sd["param_groups"][1]["lr"] = -1.0

    return {f.__name__: f for f in (shape, unknown_key, missing_key, missing_max_sq, few_groups, many_groups,
                                    few_params, many_params, unlisted_param, step_fraction, step_negative,
                                    step_not_number, moment_not_float, group_bad_lr)}


BAD_SD = _bad_state_dicts()


@pytest.mark.parametrize("case", sorted(BAD_SD))
def test_bad_state_dict_raises_and_changes_nothing(case):
    params = make_params()  # (7,), (5, 3), (17, 9): ids 0, 1, 2
    opt = onepass.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 2e-3}])
    run_steps(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    # A good part that a partial load would show: new settings and values elsewhere.
    sd["param_groups"][0]["lr"] = 0.5
    sd["param_groups"][0]["weight_decay"] = 0.25
    sd["state"][0]["exp_avg"] = torch.ones(7)
    sd["state"][0]["step"] = torch.tensor(40.0)
    sd["state"][2]["exp_avg_sq"] = torch.full((17, 9), 3.0)
    BAD_SD[case](sd)
    snap = snapshot(opt)
    state_obj = opt.state
    with pytest.raises((ValueError, TypeError, KeyError)):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
    assert opt.state is state_obj
    # the optimizer still works and gives the bits of an untouched twin
    twin_p = clone_params(make_params())
    twin = onepass.AdamW([{"params": twin_p[:1]}, {"params": twin_p[1:], "lr": 2e-3}])
    run_steps(twin, twin_p, 2)
    run_steps(opt, params, 1, start=2)
    run_steps(twin, twin_p, 1, start=2)
    assert_params_equal(params, twin_p)


def test_good_state_dict_with_edited_values_loads():
    # The positive control of the test above: the same edits without the spoiling do load.
    params = make_params()
    opt = onepass.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 2e-3}])
    run_steps(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.5
    sd["state"][0]["exp_avg"] = torch.ones(7)
    sd["state"][0]["step"] = 40  # a Python int is a whole number too
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(opt.state[params[0]]["exp_avg"], torch.ones(7))
    assert opt.state[params[0]]["step"].dtype == torch.float32 and float(opt.state[params[0]]["step"]) == 40


# ---------------------------------------------------------------------------------------------------
# What a loaded state dict replaces: saved settings win, but not where or in what format this run
# keeps its state
# ---------------------------------------------------------------------------------------------------

def test_load_keeps_the_constructors_backend_and_state_dtype():
    big = [(70, 80), (9,)]  # one int8-sized tensor, one that keeps fp32 state
    saver_params = make_params(big)
    saver = onepass.AdamW(saver_params, lr=1e-2, backend="reference")
    run_steps(saver, saver_params, 3)
    params = clone_params(saver_params)
    opt = onepass.AdamW(params, lr=1e-2, state_dtype="int8", backend="cpu")
    opt.load_state_dict(copy.deepcopy(saver.state_dict()))
    g = opt.param_groups[0]
    assert (g["backend"], g["state_dtype"]) == ("cpu", "int8")
    assert opt.state[params[0]]["exp_avg"].dtype == torch.uint8  # codes: quantized on load
    run_steps(opt, params, 1, start=3)
    assert opt.last_backends == ["cpu"]
    # the other way: int8 state loaded into an fp32 optimizer is dequantized, and runs there
    back = clone_params(params)
    fp32 = onepass.AdamW(back, lr=1e-2, backend="reference")
    fp32.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fp32.param_groups[0]["state_dtype"] == "fp32"
    assert fp32.state[back[0]]["exp_avg"].dtype == torch.float32
    assert "exp_avg_absmax" not in fp32.state[back[0]]
    run_steps(fp32, back, 1, start=4)
    assert fp32.last_backends == ["reference"]
    # and the saved hyperparameters do win
    saver.param_groups[0]["lr"] = 0.5
    opt.load_state_dict(copy.deepcopy(saver.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lr_independent_exports_torchs_weight_decay(backend):
    # torch shrinks by lr * wd: the exported wd is wd / lr_max, so torch continues with the same
    # shrink, and onepass reading the export back continues bit for bit
    kw = dict(lr=1e-2, weight_decay=0.3)
    op = make_params()
    ours = onepass.AdamW(op, decay_mode="lr_independent", lr_max=0.05, backend=backend, **kw)
    run_steps(ours, op, 3)
    sd = onepass.optimizer.torch_state_dict(ours)
    g = sd["param_groups"][0]
    assert g["weight_decay"] == 0.3 / 0.05 and g["decay_mode"] == "decoupled" and "lr_max" not in g
    tp, rp = clone_params(op), clone_params(op)
    theirs = torch.optim.AdamW(tp, foreach=False, **kw)
    theirs.load_state_dict(copy.deepcopy(sd))
    again = onepass.AdamW(rp, backend=backend, **kw)
    again.load_state_dict(copy.deepcopy(sd))
    for opt, ps in ((ours, op), (theirs, tp), (again, rp)):
        run_steps(opt, ps, 5, start=3)
    assert_params_equal(rp, op)
    assert_params_close(tp, op)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scheduled", [False, True])
def test_torch_checkpoint_into_lr_independent_takes_lr_max_from_its_lr(backend, scheduled):
    tp = make_params()
    theirs = torch.optim.AdamW(tp, lr=1e-2, weight_decay=0.1, foreach=False)
    if scheduled:  # a scheduler records the starting lr as initial_lr; the lr is past it
        sched = torch.optim.lr_scheduler.StepLR(theirs, 1, gamma=0.5)
    for t in range(2):
        run_steps(theirs, tp, 1, start=t)
        if scheduled:
            sched.step()
    op = clone_params(tp)
    ours = onepass.AdamW(op, lr=1.0, decay_mode="lr_independent", backend=backend)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    g = ours.param_groups[0]
    assert g["lr_max"] == 1e-2 and g["lr"] == (2.5e-3 if scheduled else 1e-2)
    # an lr_max given to the constructor is kept
    named = onepass.AdamW(clone_params(tp), decay_mode="lr_independent", lr_max=0.25)
    named.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert named.param_groups[0]["lr_max"] == 0.25
    # the same steps as a decoupled optimizer with weight_decay / lr_max
    rp = clone_params(tp)
    same = onepass.AdamW(rp, backend=backend)
    sd = copy.deepcopy(theirs.state_dict())
    sd["param_groups"][0]["weight_decay"] = 0.1 / 1e-2
    same.load_state_dict(sd)
    run_steps(ours, op, 3, start=2)
    run_steps(same, rp, 3, start=2)
    assert_params_equal(op, rp)


def _int8_faults():
    def codes_as_int8(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].to(torch.int8)

    def negative_absmax(sd):
        sd["state"][0]["exp_avg_absmax"][0, 0] = -1.0

    def nan_absmax(sd):
        sd["state"][0]["exp_avg_sq_absmax"][1, 0] = float("nan")

    def fp32_moments_with_absmax(sd):
        sd["state"][0]["exp_avg"] = torch.zeros(64, 80)
        sd["state"][0]["exp_avg_sq"] = torch.zeros(64, 80)

    def state_a_list(sd):
        sd["state"] = [sd["state"][0]]

    def groups_not_dicts(sd):
        sd["param_groups"] = [[0]]

    def groups_a_number(sd):
        sd["param_groups"] = 5

    return [(codes_as_int8, "needs uint8 codes .* got torch.int8"),
            (negative_absmax, "exp_avg_absmax.*finite and >= 0"),
            (nan_absmax, "exp_avg_sq_absmax.*finite and >= 0"),
            (fp32_moments_with_absmax, "needs uint8 codes .* got torch.float32"),
            (state_a_list, "'state' must be a dict"),
            (groups_not_dicts, "'param_groups' must be a list of dicts"),
            (groups_a_number, "'param_groups' must be a list of dicts")]


@pytest.mark.parametrize("fault,words", _int8_faults(), ids=lambda x: getattr(x, "__name__", ""))
def test_a_malformed_int8_checkpoint_is_refused_and_changes_nothing(fault, words):
    def made():
        ps = make_params([(64, 80)])
        opt = onepass.AdamW(ps, lr=1e-2, state_dtype="int8", min_int8_numel=16)
        run_steps(opt, ps, 2)
        return opt

    sd = copy.deepcopy(made().state_dict())
    fault(sd)
    opt = made()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(sd)
    assert_unchanged(opt, snap)
