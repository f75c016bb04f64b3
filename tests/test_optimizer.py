"""onepass.AdamW / onepass.Adam as drop-in torch.optim optimizers: signature, defaults and param
groups, the bits against torch.optim, the zero-gradient first step, and the rest of the API
(closures, params without grads, zero_grad, hand-edited state, copies). Every test runs on each
backend available for CPU tensors here.
"""
from __future__ import annotations

import copy
import inspect
import pickle
from collections import defaultdict

import pytest
import torch

import onepass
from onepass import reference
from onepass.backends import BACKENDS

from .optimizer_helpers import (CPU_BACKENDS, REL_TOL, all_params, assert_params_close,
                                assert_params_equal, assert_state_equal, clone_params, make_grads,
                                make_params, rel_err, run_steps, set_grads)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------------
# Signature, defaults, param groups
# ---------------------------------------------------------------------------------------------------

def _params_of(fn):
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"}


@pytest.mark.parametrize("ours,theirs", [(onepass.AdamW, torch.optim.AdamW), (onepass.Adam, torch.optim.Adam)],
                         ids=["AdamW", "Adam"])
def test_signature_matches_torch(ours, theirs):
    mine, ref = _params_of(ours.__init__), _params_of(theirs.__init__)
    for name, p in ref.items():
        assert name in mine, f"{ours.__name__} lacks torch's argument {name!r}"
        assert mine[name].default == p.default, f"default of {name!r}: {mine[name].default!r} != {p.default!r}"
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        assert (mine[name].kind in positional) == (p.kind in positional), f"kind of {name!r} differs"
    # positional order matches torch's
    pos = [n for n, p in ref.items() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [n for n in mine if mine[n].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD][: len(pos)] == pos


def test_adamw_defaults_equal_torch():
    p = make_params([(3,)])
    ours = onepass.AdamW(p)
    theirs = torch.optim.AdamW(clone_params(p))
    for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert ours.defaults[k] == theirs.defaults[k], k
        assert ours.param_groups[0][k] == theirs.param_groups[0][k], k
    assert ours.defaults["lr"] == 1e-3 and tuple(ours.defaults["betas"]) == (0.9, 0.999)
    assert ours.defaults["eps"] == 1e-8 and ours.defaults["weight_decay"] == 1e-2
    assert ours.defaults["amsgrad"] is False and ours.defaults["maximize"] is False
    assert ours.defaults["decoupled"] is True


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_foreach_fused_capturable_accepted_and_same_bits(backend):
    params = make_params()
    plain = onepass.AdamW(params, backend=backend)
    twins = []
    for kw in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False), dict(capturable=True)):
        q = clone_params(params)
        twins.append((q, onepass.AdamW(q, backend=backend, **kw)))
    for t in range(3):
        grads = make_grads(params, t)
        set_grads(params, grads)
        plain.step()
        for q, o in twins:
            set_grads(q, grads)
            o.step()
    for q, _ in twins:
        assert_params_equal(q, params)


def test_adam_defaults_equal_torch_adam():
    p = make_params([(3,)])
    ours = onepass.Adam(p)
    theirs = torch.optim.Adam(clone_params(p))
    for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert ours.defaults[k] == theirs.defaults[k], k
    assert ours.defaults["weight_decay"] == 0
    assert ours.defaults["decoupled"] is False
    assert ours.param_groups[0]["decoupled"] is False


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adam_is_coupled_and_decoupled_weight_decay_gives_adamw_bits(backend):
    wd = 0.1
    base = make_params()
    runs = {
        "adam": (lambda q: onepass.Adam(q, weight_decay=wd, backend=backend)),
        "adamw_coupled": (lambda q: onepass.AdamW(q, weight_decay=wd, decoupled=False, backend=backend)),
        "adam_decoupled": (lambda q: onepass.Adam(q, weight_decay=wd, decoupled_weight_decay=True, backend=backend)),
        "adamw": (lambda q: onepass.AdamW(q, weight_decay=wd, backend=backend)),
    }
    out = {}
    for name, ctor in runs.items():
        q = clone_params(base)
        run_steps(ctor(q), q, 4)
        out[name] = q
    assert_params_equal(out["adam"], out["adamw_coupled"])
    assert_params_equal(out["adam_decoupled"], out["adamw"])
    # and the two modes really differ (the comparisons above are not vacuous)
    assert not all(torch.equal(a, b) for a, b in zip(out["adam"], out["adamw"]))


def test_param_groups_override_every_hyperparameter(monkeypatch):
    other = "reference" if "cpu" in CPU_BACKENDS else CPU_BACKENDS[0]
    settings_a = {}  # the constructor's values
    ctor = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                maximize=False, decoupled=True, backend="auto")
    settings_b = dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.3, amsgrad=True,
                      maximize=True, decoupled=False, backend=other)
    pa, pb = make_params(seed=1), make_params(seed=2)
    opt = onepass.AdamW([{"params": pa, **settings_a}, {"params": pb, **settings_b}], **ctor)
    qa, qb = clone_params(pa), clone_params(pb)
    single_a = onepass.AdamW(qa, **ctor)
    single_b = onepass.AdamW(qb, **settings_b)
    # The group override of `backend` is observable only through which backend runs: count calls.
    calls = {n: 0 for n in CPU_BACKENDS}
    originals = {n: BACKENDS[n].step for n in CPU_BACKENDS}

    def spy(name):
        def step(batch):
            calls[name] += 1
            return originals[name](batch)
        return step

    for n in CPU_BACKENDS:
        monkeypatch.setattr(BACKENDS[n], "step", spy(n))
    for t in range(5):
        ga, gb = make_grads(pa, t, 1), make_grads(pb, t, 2)
        set_grads(pa, ga)
        set_grads(pb, gb)
        set_grads(qa, ga)
        set_grads(qb, gb)
        for n in calls:
            calls[n] = 0
        opt.step()
        if len(CPU_BACKENDS) > 1:
            auto = "cpu" if "cpu" in CPU_BACKENDS else "reference"
            want = {n: 0 for n in CPU_BACKENDS}
            want[auto] += 1
            want[other] += 1
            assert calls == want, calls
        single_a.step()
        single_b.step()
    monkeypatch.undo()
    assert_params_equal(pa, qa)
    assert_params_equal(pb, qb)
    for p, q in zip(pb, qb):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], single_b.state[q][k]), k
    for p, q in zip(pa, qa):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], single_a.state[q][k]), k
    # group b's settings matter: with the constructor's settings its params would differ
    qc = clone_params(make_params(seed=2))
    oc = onepass.AdamW(qc, **ctor)
    for t in range(5):
        set_grads(qc, make_grads(qc, t, 2))
        oc.step()
    assert not all(torch.equal(a, b) for a, b in zip(qc, pb))

# ---------------------------------------------------------------------------------------------------
# Against torch.optim
# ---------------------------------------------------------------------------------------------------

TORCH_CASES = [
    ("adamw", dict(lr=1e-3, weight_decay=1e-2)),
    ("adamw_lr_wd", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    ("amsgrad", dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
    ("maximize", dict(lr=1e-2, weight_decay=1e-2, maximize=True)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,kw", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch_adamw_100_steps(backend, name, kw):
    params = make_params()
    theirs_p = clone_params(params)
    ours = onepass.AdamW(params, backend=backend, **kw)
    theirs = torch.optim.AdamW(theirs_p, foreach=False, **kw)
    for t in range(100):
        grads = make_grads(params, t)
        set_grads(params, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    assert_params_close(params, theirs_p)
    for p, q in zip(params, theirs_p):
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]) == 100
        assert rel_err(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"]) < REL_TOL
    # and the params really moved
    assert all(rel_err(p, q) > 1e-4 for p, q in zip(params, make_params()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_l2_matches_torch_adam(backend, amsgrad):
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    params = make_params()
    theirs_p = clone_params(params)
    ours = onepass.Adam(params, backend=backend, **kw)
    theirs = torch.optim.Adam(theirs_p, foreach=False, **kw)
    for t in range(100):
        grads = make_grads(params, t)
        set_grads(params, grads)
        set_grads(theirs_p, grads)
        ours.step()
        theirs.step()
    assert_params_close(params, theirs_p)
    # Adam's L2 and AdamW's decay differ enough to be told apart at this tolerance
    w_p = clone_params(make_params())
    w = torch.optim.AdamW(w_p, foreach=False, **kw)
    run_steps(w, w_p, 100)
    assert any(rel_err(p, q) > 10 * REL_TOL for p, q in zip(params, w_p))

# ---------------------------------------------------------------------------------------------------
# The zero-gradient check
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_grad_first_step_adamw_only_decays(backend):
    lr, wd = 1e-2, 0.1
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(64, generator=g))
    start = w.detach().clone()
    opt = onepass.AdamW([w], lr=lr, weight_decay=wd, backend=backend)
    w.grad = torch.zeros_like(w)
    opt.step()
    decay = torch.tensor(1.0 - lr * wd, dtype=torch.float64).to(torch.float32)
    expected = start * decay
    assert torch.equal(w.detach(), expected)
    assert not torch.equal(w.detach(), start)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_grad_first_step_adam_l2_moves_by_lr(backend):
    lr, wd = 1e-3, 1e-2
    g = torch.Generator().manual_seed(6)
    sign = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0)
    start = sign * (0.5 + 1.5 * torch.rand(64, generator=g))  # |w| in [0.5, 2]
    w = torch.nn.Parameter(start.clone())
    opt = onepass.Adam([w], lr=lr, weight_decay=wd, backend=backend)
    w.grad = torch.zeros_like(w)
    opt.step()
    delta = w.detach() - start
    assert torch.equal(torch.sign(delta), -torch.sign(start))
    assert torch.allclose(delta.abs(), torch.full_like(delta, lr), rtol=1e-3, atol=0)

# ---------------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_closure_is_called_and_its_loss_returned(backend):
    params = make_params()
    twin = clone_params(params)
    x = torch.randn(9, generator=torch.Generator().manual_seed(3))
    calls = []

    def loss_of(ps):
        return (ps[0].sum() ** 2) + (ps[1] ** 2).sum() + (ps[2] @ x).pow(2).sum()

    opt = onepass.AdamW(params, backend=backend)

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_of(params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and torch.equal(loss.detach(), loss_of(twin).detach())
    ref = onepass.AdamW(twin, backend=backend)
    loss_of(twin).backward()
    ref.step()
    assert_params_equal(params, twin)
    assert not torch.equal(params[0].detach(), make_params()[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_without_grads_are_skipped(backend):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = onepass.AdamW(params, backend=backend)
    params[0].grad = make_grads(params, 0)[0]
    params[2].grad = make_grads(params, 0)[2]
    opt.step()
    assert params[1] not in opt.state
    assert torch.equal(params[1].detach(), before[1])
    assert float(opt.state[params[0]]["step"]) == 1 and float(opt.state[params[2]]["step"]) == 1
    assert not torch.equal(params[0].detach(), before[0])
    # the skipped param joins later with its own step count
    params[1].grad = make_grads(params, 1)[1]
    opt.step()
    assert float(opt.state[params[1]]["step"]) == 1
    assert float(opt.state[params[0]]["step"]) == 2
    # its update is a first step: compare to a fresh single-param optimizer
    solo = torch.nn.Parameter(before[1].clone())
    solo_opt = onepass.AdamW([solo], backend=backend)
    solo.grad = make_grads(params, 1)[1]
    solo_opt.step()
    assert torch.equal(solo.detach(), params[1].detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_params(backend):
    params = [torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.randn(4, 3)),
              torch.nn.Parameter(torch.empty(0, 5))]
    solo = torch.nn.Parameter(params[1].detach().clone())
    opt = onepass.AdamW(params, backend=backend)
    solo_opt = onepass.AdamW([solo], backend=backend)
    for t in range(3):
        grads = make_grads(params, t)
        set_grads(params, grads)
        solo.grad = grads[1].clone()
        opt.step()
        solo_opt.step()
    for i in (0, 2):
        st = opt.state[params[i]]
        assert st["exp_avg"].shape == params[i].shape and st["exp_avg_sq"].shape == params[i].shape
        assert st["exp_avg"].dtype == torch.float32
        assert float(st["step"]) == 3
    assert torch.equal(solo.detach(), params[1].detach())
    assert float(opt.state[params[1]]["step"]) == 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_grad(backend):
    params = make_params()
    opt = onepass.AdamW(params, backend=backend)
    set_grads(params, make_grads(params, 0))
    opt.zero_grad(set_to_none=False)
    for p in params:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no grads: nothing to do
    assert_params_equal(params, before)
    assert len(opt.state) == 0


def _reference_step(params, states, grads, **kw):
    """The reference applied to clones of the given state (the expected outcome)."""
    out_p, out_s = [], []
    for p, st, g in zip(params, states, grads):
        p2 = p.detach().clone()
        st2 = {k: v.clone() for k, v in st.items()}
        reference.adam_step_(p2, g, st2["exp_avg"], st2["exp_avg_sq"], st2.get("max_exp_avg_sq"), st2["step"],
                             lr=kw["lr"], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=kw["weight_decay"],
                             amsgrad=kw["amsgrad"], maximize=False, decoupled=True)
        out_p.append(p2)
        out_s.append(st2)
    return out_p, out_s


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["replace_tensor", "replace_dict", "inplace_edit", "delete_state"])
def test_hand_edited_state_is_honoured(backend, how):
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    params = make_params()
    opt = onepass.AdamW(params, backend=backend, **kw)
    run_steps(opt, params, 3)  # the state lists are cached by now
    p = params[1]
    if how == "replace_tensor":
        opt.state[p]["exp_avg"] = torch.zeros_like(p)
        opt.state[p]["step"] = torch.tensor(10.0)
    elif how == "replace_dict":
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.full_like(p, 0.5),
                        "exp_avg_sq": torch.full_like(p, 2.0), "max_exp_avg_sq": torch.full_like(p, 3.0)}
    elif how == "inplace_edit":
        opt.state[p]["exp_avg_sq"].mul_(4.0)  # same tensor object: trivially seen
    elif how == "delete_state":
        del opt.state[p]
    states = [{k: v.clone() for k, v in opt.state[q].items()} if q in opt.state else
              {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(q), "exp_avg_sq": torch.zeros_like(q),
               "max_exp_avg_sq": torch.zeros_like(q)} for q in params]
    grads = make_grads(params, 3)
    exp_p, exp_s = _reference_step(params, states, grads, **kw)
    set_grads(params, grads)
    opt.step()
    for q, ep, es in zip(params, exp_p, exp_s):
        assert torch.equal(q.detach(), ep)
        for k in es:
            assert torch.equal(opt.state[q][k], es[k]), k
    # a plain dict put in by hand: later writes to it are seen too
    if how == "replace_dict":
        opt.state[p]["exp_avg"] = torch.full_like(p, 7.0)
        states = [{k: v.clone() for k, v in opt.state[q].items()} for q in params]
        grads = make_grads(params, 4)
        exp_p, exp_s = _reference_step(params, states, grads, **kw)
        set_grads(params, grads)
        opt.step()
        for q, ep in zip(params, exp_p):
            assert torch.equal(q.detach(), ep)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_replaced_wholesale_is_honoured(backend):
    params = make_params()
    opt = onepass.AdamW(params, backend=backend)
    run_steps(opt, params, 2)
    opt.state = defaultdict(dict)  # what some user code (and old torch code) does
    grads = make_grads(params, 2)
    set_grads(params, grads)
    twin = clone_params(params)
    fresh = onepass.AdamW(twin, backend=backend)
    set_grads(twin, grads)
    opt.step()
    fresh.step()
    assert_params_equal(params, twin)
    for q in params:
        assert float(opt.state[q]["step"]) == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_identically(backend, how):
    params = make_params()
    opt = onepass.AdamW([{"params": params[:2]}, {"params": params[2:], "amsgrad": True}], lr=1e-2,
                        backend=backend)
    run_steps(opt, params, 3)
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    cparams = all_params(copied)
    assert all(c is not p for c, p in zip(cparams, params))
    assert_params_equal(cparams, params)
    assert set(map(id, copied.state)) == set(map(id, cparams))
    assert_state_equal(opt, copied)
    run_steps(opt, params, 3, start=3)
    run_steps(copied, cparams, 3, start=3)
    assert_params_equal(cparams, params)
    assert_state_equal(opt, copied)
    # the copy's state is its own: a hand edit in the copy is honoured there, not in the original
    copied.state[cparams[0]]["exp_avg"] = torch.zeros_like(cparams[0])
    run_steps(opt, params, 1, start=6)
    run_steps(copied, cparams, 1, start=6)
    assert torch.equal(cparams[1], params[1])
    assert not torch.equal(cparams[0], params[0])
