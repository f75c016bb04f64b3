"""What the optimizer tests share: params, grads and steps made the same way, snapshots, and
the comparisons (bit-exact with torch.equal; a tolerance only against torch.optim)."""
from __future__ import annotations

import copy
import io
import math

import torch

import onepass

CPU_BACKENDS = onepass.available_backends("cpu")
SHAPES = [(7,), (5, 3), (17, 9)]
REL_TOL = 1e-6


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
