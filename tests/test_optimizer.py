"""Tests of onepass.AdamW / onepass.Adam as drop-in torch.optim optimizers.

Bit-exact comparisons use torch.equal; a tolerance appears only against torch.optim (a different
operation order). Every test runs on each backend that is available for CPU tensors here.
"""
from __future__ import annotations

import copy
import inspect
import io
import math
import pickle
from collections import defaultdict

import pytest
import torch

import onepass
from onepass import reference
from onepass.backends import BACKENDS

# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------

CPU_BACKENDS = onepass.available_backends("cpu")
SHAPES = [(7,), (5, 3), (17, 9)]
REL_TOL = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32).to(dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def make_grads(params, step, seed=1234, scale=1.0):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [(torch.randn(p.shape, generator=g, dtype=torch.float32) * scale).to(p.dtype) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def rel_err(a, b):
    a = a.detach().double()
    b = b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def assert_params_close(ps, qs, tol=REL_TOL):
    for p, q in zip(ps, qs):
        err = rel_err(p, q)
        assert err < tol, f"relative error {err:.3e} >= {tol:g} for shape {tuple(p.shape)}"


def assert_params_equal(ps, qs):
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach()), f"params of shape {tuple(p.shape)} differ"


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt):
    """Params, the full state (keyed by position) and the groups' settings, all cloned."""
    params = all_params(opt)
    pos = {id(p): i for i, p in enumerate(params)}
    state = {}
    for p, st in opt.state.items():
        state[pos[id(p)]] = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                             for k, v in st.items()}
    groups = []
    for g in opt.param_groups:
        groups.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                       for k, v in g.items() if k != "params"})
    return {
        "params": [p.detach().clone() for p in params],
        "param_ids": [id(p) for p in params],
        "group_sizes": [len(g["params"]) for g in opt.param_groups],
        "state": state,
        "groups": groups,
    }


def _same_value(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_unchanged(opt, snap):
    now = snapshot(opt)
    assert now["param_ids"] == snap["param_ids"], "the optimizer's params changed"
    assert now["group_sizes"] == snap["group_sizes"]
    for i, (a, b) in enumerate(zip(now["params"], snap["params"])):
        assert torch.equal(a, b), f"param {i} changed"
    assert set(now["state"]) == set(snap["state"]), (
        f"state exists for params {sorted(now['state'])}, before: {sorted(snap['state'])}")
    for i, st in snap["state"].items():
        assert set(now["state"][i]) == set(st), f"state keys of param {i} changed"
        for k, v in st.items():
            assert _same_value(now["state"][i][k], v), f"state {k!r} of param {i} changed"
    assert len(now["groups"]) == len(snap["groups"])
    for a, b in zip(now["groups"], snap["groups"]):
        assert set(a) == set(b), "param group keys changed"
        for k in b:
            assert _same_value(a[k], b[k]), f"param group setting {k!r} changed"


def assert_state_equal(opt_a, opt_b):
    pa, pb = all_params(opt_a), all_params(opt_b)
    for p, q in zip(pa, pb):
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert set(sa) == set(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, k
            assert torch.equal(sa[k], sb[k]), f"state {k!r} differs"


def run_steps(opt, params, steps, start=0, seed=1234):
    for t in range(start, start + steps):
        set_grads(params, make_grads(params, t, seed))
        opt.step()


def trained(backend="auto", steps=3, amsgrad=False, shapes=SHAPES, **kw):
    params = make_params(shapes)
    opt = onepass.AdamW(params, lr=1e-2, amsgrad=amsgrad, backend=backend, **kw)
    run_steps(opt, params, steps)
    return params, opt


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only default


# ---------------------------------------------------------------------------------------------------
# 1. Signature, defaults, param groups
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
# 2. Against torch.optim
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
# 3. State dicts
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


# ---------------------------------------------------------------------------------------------------
# 4. lr schedulers and Tensor lr
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
# 5. GradScaler
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


# ---------------------------------------------------------------------------------------------------
# 6. The zero-gradient check
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
# 7. Bad input: a clear error, nothing changes
# ---------------------------------------------------------------------------------------------------

def _sparse_embedding(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(10, 4, sparse=True)


def _sparse_backward(emb):
    emb.weight.grad = None
    emb(torch.tensor([1, 3, 3])).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "with_state"])
def test_sparse_grad_raises_and_changes_nothing(backend, warm):
    emb = _sparse_embedding()
    opt = onepass.AdamW(emb.parameters(), backend=backend)
    if warm:
        emb.weight.grad = torch.ones_like(emb.weight)
        opt.step()
    _sparse_backward(emb)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_grad_in_second_group_leaves_first_group_untouched(backend):
    emb = _sparse_embedding()
    dense = make_params([(5, 3), (4,)])
    opt = onepass.AdamW([{"params": dense}, {"params": [emb.weight]}], backend=backend)
    set_grads(dense, make_grads(dense, 0))
    emb.weight.grad = torch.ones_like(emb.weight)
    opt.step()
    set_grads(dense, make_grads(dense, 1))
    _sparse_backward(emb)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, snap)


def test_param_group_params_may_be_a_generator():
    # torch.optim accepts {"params": model.parameters()} in a group dict; so must onepass.
    model = torch.nn.Linear(3, 2)
    extra = torch.nn.Linear(2, 2)
    theirs = torch.optim.AdamW([{"params": model.parameters(), "lr": 0.1}])
    ours = onepass.AdamW([{"params": model.parameters(), "lr": 0.1}])
    assert [len(g["params"]) for g in theirs.param_groups] == [2]
    assert [len(g["params"]) for g in ours.param_groups] == [2]
    ours.add_param_group({"params": extra.parameters(), "lr": 0.2})
    assert [len(g["params"]) for g in ours.param_groups] == [2, 2]
    model(torch.randn(4, 3)).sum().backward()
    before = model.weight.detach().clone()
    ours.step()
    assert not torch.equal(model.weight.detach(), before)


def test_complex32_param_rejected_at_construction():
    # complex64/complex128 params are optimized as torch does (tests/test_complex.py); complex32
    # (no full-precision math dtype of its own) is refused like any other unsupported dtype
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))
    with pytest.raises(TypeError, match="complex"):
        onepass.AdamW([p])
    opt = onepass.AdamW(make_params([(3,)]))
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_params_on_two_devices_rejected_at_construction():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="device"):
        onepass.AdamW([a, b])
    # two groups on two devices are fine: the rule is per group
    opt = onepass.AdamW([{"params": [a]}, {"params": [b]}])
    assert len(opt.param_groups) == 2


BAD_HYPERPARAMETERS = [
    ("lr", -1e-3),
    ("betas", (1.0, 0.999)),
    ("betas", (-0.1, 0.999)),
    ("betas", (0.9, 1.0)),
    ("betas", (0.9, -0.1)),
    ("eps", -1e-8),
    ("weight_decay", -1e-2),
    ("lr", float("nan")),
    ("lr", torch.tensor(-1e-3)),
]
BAD_IDS = ["lr<0", "beta1=1", "beta1<0", "beta2=1", "beta2<0", "eps<0", "wd<0", "lr=nan", "tensor_lr<0"]


@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.Adam], ids=["AdamW", "Adam"])
@pytest.mark.parametrize("key,value", BAD_HYPERPARAMETERS, ids=BAD_IDS)
def test_bad_hyperparameter_rejected_at_construction(cls, key, value):
    with pytest.raises(ValueError):
        cls(make_params([(3,)]), **{key: value})
    with pytest.raises(ValueError):
        cls([{"params": make_params([(3,)]), key: value}])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key,value", BAD_HYPERPARAMETERS, ids=BAD_IDS)
def test_bad_hyperparameter_set_later_fails_step_and_changes_nothing(backend, key, value):
    params = make_params()
    opt = onepass.AdamW([{"params": params[:1]}, {"params": params[1:]}], backend=backend)
    run_steps(opt, params, 2)
    set_grads(params, make_grads(params, 2))
    opt.param_groups[1][key] = value
    snap = snapshot(opt)
    with pytest.raises(ValueError):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "with_state"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_grad_raises_and_changes_nothing(backend, warm, bad):
    params = make_params()
    opt = onepass.AdamW(params, backend=backend)
    if warm:
        run_steps(opt, params, 2)
    set_grads(params, make_grads(params, 5))
    # torch refuses to assign a grad of the wrong shape or dtype to p.grad; swapping the grad's
    # .data gets one past it.
    if bad == "shape":
        params[1].grad.data = torch.randn(4, 4)
        assert params[1].grad.shape != params[1].shape
    else:
        params[1].grad.data = torch.randn(params[1].shape, dtype=torch.float64)
        assert params[1].grad.dtype != params[1].dtype
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=bad if bad == "shape" else "Double|float64"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_rejects_wrong_grad_dtype_without_writing(backend):
    params = make_params([(5, 3)])
    opt = onepass.AdamW(params, backend=backend)
    run_steps(opt, params, 1)
    st = opt.state[params[0]]
    batch = onepass.backends.Batch(
        params=[params[0].detach()], grads=[torch.randn(5, 3, dtype=torch.float64)],
        exp_avgs=[st["exp_avg"]], exp_avg_sqs=[st["exp_avg_sq"]], max_exp_avg_sqs=[],
        steps=[st["step"]], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
        amsgrad=False, maximize=False, decoupled=True,
    )
    snap = snapshot(opt)
    b = BACKENDS[backend]
    with pytest.raises(RuntimeError):
        b.validate(batch)
    assert_unchanged(opt, snap)
    if b.checks_before_writing:
        with pytest.raises(RuntimeError):
            b.step(batch)
        assert_unchanged(opt, snap)


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
# 8. Misc
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
