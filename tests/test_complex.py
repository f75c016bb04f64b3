"""Complex params (issue #15, item 5): optimized as torch.optim.Adam(W) optimizes them, as
torch.view_as_real(p) -- the real and imaginary parts are independent real params -- with the
state torch keeps (exp_avg, exp_avg_sq, max_exp_avg_sq of the param's complex dtype and shape).

- every CPU backend gives the reference's bits on complex64 / complex128 params, after every
  step, params and state, with a state_dict() round trip through torch.save / torch.load mid-run;
  in groups that mix complex and real params, under every option and state format (complex
  params keep complex full-precision state under state_dtype="bf16"/"int8");
- onepass agrees with torch.optim.AdamW / Adam on complex params within a tolerance;
- state dicts move between torch.optim and onepass in both directions, and wrong moments for a
  complex param (real, bf16) are refused without changing anything.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import onepass
from onepass.optimizer import torch_state_dict

from tests._bits import first_difference

CPU_BACKENDS = onepass.available_backends("cpu")
OTHER_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]
COMPLEX = [torch.complex64, torch.complex128]
STEPS = 4
MIN_INT8_NUMEL = 256


def _backend_param(name):
    marks = {"triton": [pytest.mark.triton], "cpu": [pytest.mark.cpu_kernel]}.get(name, [])
    if name.startswith("cuda-emu"):
        marks = [pytest.mark.emu]
    return pytest.param(name, marks=marks, id=name)


def make_params(dtype, seed=0):
    """Complex params of every kind the matrix cares about (empty, one element, odd length, 2-D,
    a 2-D one of int8 size -- MIN_INT8_NUMEL below --, a non-contiguous one) and real params in
    the same groups (an fp32 one of int8 size, a bf16 one)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(shape, generator=g, dtype=dt)

    params = [randn(0), randn(1), randn(17), randn(5, 3), randn(16, 20), randn(6, 4).t(),
              randn(16, 20, dt=torch.float32), randn(9, dt=torch.float32).to(torch.bfloat16)]
    out = [torch.nn.Parameter(p) for p in params]
    assert not out[5].is_contiguous()
    return out


def make_grads(params, step, seed=7):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    grads = []
    for i, p in enumerate(params):
        if p.dtype == torch.bfloat16:
            grads.append(torch.randn(p.shape, generator=g).to(torch.bfloat16))
        elif i == 3:  # a non-contiguous grad
            grads.append(torch.randn(tuple(reversed(p.shape)), generator=g, dtype=p.dtype).t())
        else:
            grads.append(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return grads


def groups(params):
    return [{"params": params[:4]}, {"params": params[4:], "lr": 3e-3, "weight_decay": 0.0}]


OPTIONS = {
    "adamw": (onepass.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "amsgrad": (onepass.AdamW, dict(lr=1e-2, amsgrad=True)),
    "maximize": (onepass.AdamW, dict(lr=1e-2, maximize=True, weight_decay=0.1)),
    "adam_l2": (onepass.Adam, dict(lr=1e-2, weight_decay=0.1)),
    "wd0": (onepass.AdamW, dict(lr=1e-2, weight_decay=0.0)),
    "tensor_lr": (onepass.AdamW, dict(lr=torch.tensor(1e-2))),
    "bf16_state": (onepass.AdamW, dict(lr=1e-2, state_dtype="bf16")),
    # (min_int8_numel: int8 for the 320-element params, small enough for the triton interpreter)
    "int8_state": (onepass.AdamW, dict(lr=1e-2, state_dtype="int8", min_int8_numel=MIN_INT8_NUMEL)),
    "kahan": (onepass.AdamW, dict(lr=1e-2, state_dtype="bf16", param_rounding="kahan")),
}


def _kwargs(kwargs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _snapshot(opt, params):
    snap = {f"p{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            snap[f"p{i}.{k}"] = v.detach().clone()
    return snap


def _run(option, dtype, backend, reload_at=None):
    """STEPS steps; at step ``reload_at`` the state dict goes through torch.save / torch.load
    into a fresh optimizer over fresh params, which continues."""
    cls, kwargs = OPTIONS[option]
    params = make_params(dtype)
    opt = cls(groups(params), backend=backend, **_kwargs(kwargs))
    snaps = []
    for step in range(STEPS):
        if step == reload_at:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = cls(groups(params), backend=backend, **_kwargs(kwargs))
            opt.load_state_dict(torch.load(buf, weights_only=True))
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g
        opt.step()
        snaps.append(_snapshot(opt, params))
    return opt, params, snaps


def _assert_same_bits(got, want, what):
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert set(g) == set(w), f"{what}: step {step}: keys {sorted(g)} vs {sorted(w)}"
        for k in w:
            diff = first_difference(g[k], w[k])
            assert diff is None, f"{what}: step {step}: {k}: {diff}"


@pytest.mark.parametrize("backend", [_backend_param(b) for b in OTHER_BACKENDS])
@pytest.mark.parametrize("dtype", COMPLEX, ids=["complex64", "complex128"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_complex_params_give_reference_bits(backend, dtype, option):
    _, _, want = _run(option, dtype, "reference")
    opt, params, got = _run(option, dtype, backend, reload_at=2)
    assert opt.last_backends == [backend]
    _assert_same_bits(got, want, f"{backend} vs reference")
    for p in params:
        st = opt.state[p]
        if p.is_complex():
            # torch's layout, whatever the group's state_dtype
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if k in st:
                    assert st[k].dtype == p.dtype and st[k].shape == p.shape, k
            assert set(st) <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    if option == "int8_state":  # the real fp32 param of int8 size does get int8 moments
        assert opt.state[params[6]]["exp_avg"].dtype == torch.uint8


def test_reference_complex_update_is_the_real_update():
    """The definition: a complex param moves exactly as its view_as_real twin, a real param,
    does (state too), in a group of its own or among real params."""
    for dtype in COMPLEX:
        params = make_params(dtype)
        twins = [torch.nn.Parameter(torch.view_as_real(p.detach()).clone() if p.is_complex()
                                    else p.detach().clone()) for p in params]
        a = onepass.AdamW(groups(params), backend="reference", amsgrad=True, lr=1e-2)
        b = onepass.AdamW(groups(twins), backend="reference", amsgrad=True, lr=1e-2)
        for step in range(3):
            for p, t, g in zip(params, twins, make_grads(params, step)):
                p.grad = g
                t.grad = torch.view_as_real(g).clone() if g.is_complex() else g.clone()
            a.step()
            b.step()
            for p, t in zip(params, twins):
                real = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
                assert first_difference(real, t.detach()) is None
                for k, v in a.state[p].items():
                    v = torch.view_as_real(v) if v.is_complex() else v
                    assert first_difference(v, b.state[t][k]) is None, k


# ---- against torch.optim ---------------------------------------------------------------------------

TORCH_OPTIONS = ["adamw", "amsgrad", "maximize", "adam_l2", "wd0", "tensor_lr"]


def _torch_cls(option):
    return torch.optim.Adam if OPTIONS[option][0] is onepass.Adam else torch.optim.AdamW


def _complex_only(dtype, seed=0):
    return [p for p in make_params(dtype, seed) if p.is_complex()]


@pytest.mark.parametrize("dtype", COMPLEX, ids=["complex64", "complex128"])
@pytest.mark.parametrize("option", TORCH_OPTIONS)
def test_complex_params_agree_with_torch(dtype, option):
    _, kwargs = OPTIONS[option]
    if option == "tensor_lr":
        # in the params' real dtype: torch computes AdamW's decay factor 1 - lr * wd in the lr
        # Tensor's dtype (a float32 lr costs complex128 params ~4e-8 a step there; onepass
        # computes it in the math dtype)
        kwargs = dict(kwargs, lr=kwargs["lr"].to(torch.float32 if dtype == torch.complex64
                                                  else torch.float64))
    ours_p, theirs_p = _complex_only(dtype), _complex_only(dtype)
    ours = OPTIONS[option][0](ours_p, **_kwargs(kwargs))
    theirs = _torch_cls(option)(theirs_p, **_kwargs(kwargs))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.complex64 else dict(rtol=1e-12, atol=1e-14)
    for step in range(6):
        grads = make_grads(ours_p, step)
        for p, q, g in zip(ours_p, theirs_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ours_p, theirs_p):
            torch.testing.assert_close(p.detach(), q.detach(), **tol)
            assert set(ours.state[p]) == set(theirs.state[q])
            for k, v in theirs.state[q].items():
                assert ours.state[p][k].dtype == v.dtype and ours.state[p][k].shape == v.shape, k
                torch.testing.assert_close(ours.state[p][k], v, **tol)


@pytest.mark.parametrize("direction", ["torch_to_onepass", "onepass_to_torch"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_complex_state_dicts_move_between_torch_and_onepass(direction, amsgrad):
    dtype = torch.complex64
    src_cls, dst_cls = ((torch.optim.AdamW, onepass.AdamW) if direction == "torch_to_onepass"
                        else (onepass.AdamW, torch.optim.AdamW))
    src_p = _complex_only(dtype)
    src = src_cls(src_p, lr=1e-2, amsgrad=amsgrad)
    for step in range(3):
        for p, g in zip(src_p, make_grads(src_p, step)):
            p.grad = g
        src.step()
    sd = copy.deepcopy(src.state_dict())
    if direction == "onepass_to_torch":
        # torch_state_dict: the same for fp32 state (complex moments pass through as they are)
        tsd = torch_state_dict(src)
        for pid, st in sd["state"].items():
            for k, v in st.items():
                assert torch.equal(tsd["state"][pid][k], v), k
    dst_p = [torch.nn.Parameter(p.detach().clone()) for p in src_p]
    dst = dst_cls(dst_p, lr=1e-2, amsgrad=amsgrad)
    dst.load_state_dict(sd)
    for p, q in zip(src_p, dst_p):
        for k, v in src.state[p].items():
            assert dst.state[q][k].dtype == v.dtype and torch.equal(dst.state[q][k], v), k
    for step in range(3, 6):
        grads = make_grads(src_p, step)
        for p, q, g in zip(src_p, dst_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        src.step()
        dst.step()
        for p, q in zip(src_p, dst_p):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [_backend_param(b) for b in CPU_BACKENDS])
def test_torch_complex_state_loads_into_every_backend_and_state_format(backend):
    """torch.optim.AdamW's complex state into onepass groups of every state format: complex
    moments stay complex and exact (never rounded to bf16 or int8); each backend then gives the
    reference's bits."""
    dtype = torch.complex64
    src_p = _complex_only(dtype)
    src = torch.optim.AdamW(src_p, lr=1e-2)
    for step in range(2):
        for p, g in zip(src_p, make_grads(src_p, step)):
            p.grad = g
        src.step()
    sd = src.state_dict()
    for fmt in ("fp32", "bf16", "int8"):
        runs = []
        for be in ("reference", backend):
            ps = [torch.nn.Parameter(p.detach().clone()) for p in src_p]
            opt = onepass.AdamW(ps, lr=1e-2, backend=be, state_dtype=fmt)
            opt.load_state_dict(copy.deepcopy(sd))
            for p, q in zip(src_p, ps):
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(opt.state[q][k], src.state[p][k])
            snaps = []
            for step in range(2, 4):
                for q, g in zip(ps, make_grads(ps, step)):
                    q.grad = g
                opt.step()
                snaps.append(_snapshot(opt, ps))
            runs.append(snaps)
        _assert_same_bits(runs[1], runs[0], f"{backend} {fmt} vs reference")


def _snap_opt(opt):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for g in opt.param_groups
                                              for p in g["params"]]


@pytest.mark.parametrize("bad", ["real_moments", "bf16_moments", "complex_for_real_param"])
def test_wrong_moments_for_complex_params_are_refused(bad):
    p = torch.nn.Parameter(torch.randn(64, 70, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.randn(5))
    opt = onepass.AdamW([p, r], lr=1e-2)
    p.grad, r.grad = torch.randn_like(p), torch.randn_like(r)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    if bad == "real_moments":  # e.g. a state saved for view_as_real(p) or p.real
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].real.contiguous()
        match = "complex"
    elif bad == "bf16_moments":
        for k in ("exp_avg", "exp_avg_sq"):
            sd["state"][0][k] = torch.zeros(p.shape, dtype=torch.bfloat16)
        match = "complex64"
    else:
        sd["state"][1]["exp_avg"] = sd["state"][1]["exp_avg"].to(torch.complex64)
        match = "floating-point"
    before = _snap_opt(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = _snap_opt(opt)
    for a, b in zip(before[1], after[1]):
        assert torch.equal(a, b)
    for pid, st in before[0]["state"].items():
        for k, v in st.items():
            assert torch.equal(after[0]["state"][pid][k], v)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_complex32_and_other_dtypes_are_refused_with_the_supported_list():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))
    with pytest.raises(TypeError, match="complex64 or complex128"):
        onepass.AdamW([p])


@pytest.mark.parametrize("backend", [_backend_param(b) for b in CPU_BACKENDS])
def test_conjugate_grad_is_resolved(backend):
    """A grad with a lazy conjugate bit (g.conj()) is its resolved value, as anywhere in torch
    (torch's own Adam stops at view_as_real there)."""
    a, b = _complex_only(torch.complex64), _complex_only(torch.complex64)
    oa = onepass.AdamW(a, lr=1e-2, backend=backend)
    ob = onepass.AdamW(b, lr=1e-2, backend=backend)
    for step in range(2):
        for p, q, g in zip(a, b, make_grads(a, step)):
            p.grad = g.conj()
            q.grad = g.conj().resolve_conj()
            assert p.grad.is_conj() or p.numel() == 0
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert first_difference(p.detach(), q.detach()) is None


@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("cpu", "triton") if b in CPU_BACKENDS])
def test_complex_statistics_are_those_of_the_real_view(backend):
    params = _complex_only(torch.complex64)
    twins = [torch.nn.Parameter(torch.view_as_real(p.detach()).clone()) for p in params]
    a = onepass.AdamW(params, lr=1e-2, backend=backend, statistics=True)
    b = onepass.AdamW(twins, lr=1e-2, backend=backend, statistics=True)
    for p, t, g in zip(params, twins, make_grads(params, 0)):
        p.grad, t.grad = g, torch.view_as_real(g).clone()
    a.step()
    b.step()
    sa, sb = a.statistics(), b.statistics()
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert first_difference(sa[k], sb[k]) is None, k
