"""The bit-exactness matrix (ARCHITECTURE.md section 4): every available backend on every device
present, every param dtype, every option, against the reference on the CPU, with ``torch.equal`` on
params and every state tensor after every step, and a state_dict round trip through
torch.save/torch.load in the middle of the run.

The reference always runs on the CPU, so on a GPU machine these tests also prove that a CUDA
backend (and the reference itself on cuda tensors) gives the CPU's bits.
"""
from __future__ import annotations

import io

import pytest
import torch

import onepass

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Sizes: empty, one element, a prime, SIMD tails (16k+7 and 8k+3 elements), a 2-D weight whose
# grad is handed over transposed (non-contiguous), and one large enough (> 32K elements, the CPU
# kernel's per-thread grain) that the parallel split falls inside a tensor.
SHAPES_GROUP0 = [(33, 64), (97,), (16 * 37 + 7,), (70001,)]
SHAPES_GROUP1 = [(0,), (1,), (8 * 5 + 3,)]
TRANSPOSED = 0  # index in group 0 whose grad is non-contiguous

OPTIONS = {
    "adamw": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "coupled": {"decoupled": False, "weight_decay": 0.05},
    # shrink wd * lr / lr_max with lr_max (0.3) apart from the lr (3e-2): the ratio is not 1
    "lr_independent": {"decay_mode": "lr_independent", "lr_max": 0.3, "weight_decay": 0.5},
    "wd0": {"weight_decay": 0.0},
    "tensor_lr": {"tensor_lr": True},
    "grad_scale": {"grad_scale": True},
}

STEPS = 4
SAVE_AT = 2


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


def _cases():
    for dev in _devices():
        for backend in onepass.available_backends(dev):
            marks = [pytest.mark.cuda] if dev == "cuda" else []
            if backend == "cpu":
                marks.append(pytest.mark.cpu_kernel)
            if backend.startswith("cuda-emu"):
                marks.append(pytest.mark.emu)  # the cuda kernels, emulated (tests/conftest.py)
            yield pytest.param(dev, backend, id=f"{dev}-{backend}", marks=marks)


def _make_params(dtype, device):
    gen = torch.Generator().manual_seed(1234)
    groups = []
    for shapes in (SHAPES_GROUP0, SHAPES_GROUP1):
        groups.append([
            torch.nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(device))
            for s in shapes
        ])
    return groups


def _make_opt(groups, backend, opts):
    lr = 3e-2
    if opts.get("tensor_lr"):
        lr = torch.tensor(lr)
    kw = {k: v for k, v in opts.items() if k not in ("tensor_lr", "grad_scale")}
    kw.setdefault("weight_decay", 0.1)
    return onepass.AdamW(
        [
            {"params": groups[0]},
            # a second group with its own hyperparameters: no decay, another lr and betas
            {"params": groups[1], "weight_decay": 0.0, "lr": 1e-2, "betas": (0.8, 0.99)},
        ],
        lr=lr,
        backend=backend,
        **kw,
    )


def _set_grads(groups, step, dtype, device):
    gen = torch.Generator().manual_seed(99 + step)
    for gi, params in enumerate(groups):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if step == 1 and gi == 0 and i == 1:
                g[::3] = 0.0  # exact zeros reach every branch of the math too
            if gi == 0 and i == TRANSPOSED:
                g = g.t().contiguous().t()  # same values, column-major: a non-contiguous grad
            p.grad = g.to(dtype).to(device)


def _snapshot(groups, opt):
    out = [p.detach().cpu().clone() for params in groups for p in params]
    for params in groups:
        for p in params:
            st = opt.state.get(p, {})
            for k in sorted(st):
                out.append(st[k].detach().cpu().clone())
    return out


def _set_amp(opt, device, found_inf=0.0):
    opt.grad_scale = torch.tensor(1024.0, device=device)
    opt.found_inf = torch.tensor(found_inf, device=device)


@pytest.mark.parametrize("device,backend", list(_cases()))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_backend_matches_reference_every_step(device, backend, dtype, option):
    opts = OPTIONS[option]
    cand_groups = _make_params(dtype, device)
    ref_groups = _make_params(dtype, "cpu")
    cand = _make_opt(cand_groups, backend, opts)
    ref = _make_opt(ref_groups, "reference", opts)

    for step in range(STEPS):
        _set_grads(cand_groups, step, dtype, device)
        _set_grads(ref_groups, step, dtype, "cpu")
        if opts.get("grad_scale"):
            _set_amp(cand, device)
            _set_amp(ref, "cpu")
        cand.step()
        ref.step()
        got, want = _snapshot(cand_groups, cand), _snapshot(ref_groups, ref)
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape, (step, i)
            assert torch.equal(a, b), f"step {step}: tensor {i} differs from the reference"
        if step == SAVE_AT:
            buf = io.BytesIO()
            torch.save(cand.state_dict(), buf)
            buf.seek(0)
            cand = _make_opt(cand_groups, backend, opts)
            cand.load_state_dict(torch.load(buf))

    # Every param moved: the test would pass vacuously if no backend wrote anything.
    start = _make_params(dtype, "cpu")
    moved = [not torch.equal(p.detach().cpu(), q) for p, q in zip(sum(cand_groups, []), sum(start, [])) if p.numel()]
    assert all(moved)


@pytest.mark.parametrize("device,backend", list(_cases()))
def test_found_inf_changes_nothing(device, backend):
    groups = _make_params(torch.float32, device)
    opt = _make_opt(groups, backend, {"grad_scale": True})
    for step in range(2):
        _set_grads(groups, step, torch.float32, device)
        _set_amp(opt, device)
        opt.step()
    before = _snapshot(groups, opt)
    _set_grads(groups, 5, torch.float32, device)
    _set_amp(opt, device, found_inf=1.0)
    opt.step()
    after = _snapshot(groups, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    steps = [float(opt.state[p]["step"]) for p in groups[0]]
    assert steps == [2.0] * len(steps)
