"""The cuda backend's low-precision storage: bf16 / int8 state and stochastic / Kahan bf16 params,
bit for bit against the reference backend (on the CPU) after every step (reference.py,
"Storage"). Modelled on test_lowp_cpu.py.

Each test runs on two targets: the GPU (the cuda backend on CUDA tensors; skipped with the reason
where there is none) and the emulation (the same kernels under csrc/emu/'s SIMT emulation, on CPU
tensors: backends "cuda-emu" and, for device step counts, "cuda-emu-capturable"; built by
tests/conftest.py).
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import onepass
from onepass import quant
from onepass.backends import BACKENDS

from .._bits import first_difference


class Target(NamedTuple):
    device: str      # where the kernels' tensors live
    backend: str     # host step counts
    capturable: str  # device step counts (capturable=True)


GPU = Target("cuda", "cuda", "cuda")
EMU = Target("cpu", "cuda-emu", "cuda-emu-capturable")


def _targets():
    why = "no CUDA GPU here" if not torch.cuda.is_available() else \
        BACKENDS["cuda"].unavailable_reason(torch.device("cuda"))
    gpu_marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=f"cuda backend unavailable: {why}")] if why else [])
    emu_marks = [pytest.mark.emu] + ([] if "cuda-emu" in BACKENDS else [pytest.mark.skip(
        reason="the emulated cuda backend is not built (tests/conftest.py builds it unless ONEPASS_EMU=0)")])
    return [pytest.param(GPU, id="gpu", marks=gpu_marks), pytest.param(EMU, id="emu", marks=emu_marks)]


@pytest.fixture(params=_targets())
def target(request) -> Target:
    return request.param


# (64, 300): a partial block per row; (3, 1000): rows of 4 blocks (12 blocks: a CUDA block of 8
# warps and a part-empty one); (70, 70): one partial block a row; (5000,): 1-D, which keeps fp32
# state under int8; (16 * 9 + 5,): a tail of the element-wise kernel's vector path.
SHAPES = [(64, 300), (3, 1000), (70, 70), (5000,), (16 * 9 + 5,)]
TRANSPOSED_PARAM = 0   # this param is a transposed (non-contiguous, dense) view
TRANSPOSED_GRAD = 2    # this grad is handed over transposed
STEPS = 4

OPTIONS = {
    "adamw": {},
    "maximize": {"maximize": True},
    "coupled": {"decoupled": False, "weight_decay": 0.05},
    "wd0": {"weight_decay": 0.0},
    "tensor_lr": {"tensor_lr": True},
    "grad_scale": {"grad_scale": True},  # and found_inf: the third step is skipped
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cases():
    for fmt in ("bf16", "int8", "fp32"):
        for dname, dtype in DTYPES.items():
            for rnd in ("nearest", "stochastic", "kahan"):
                if rnd != "nearest" and dtype != torch.bfloat16:
                    continue
                if fmt == "fp32" and rnd == "nearest":
                    continue  # the fp32 path: test_matrix.py
                yield pytest.param(fmt, dtype, rnd, id=f"{fmt}-{dname}-{rnd}")


CASES = list(_cases())


def _snapshot(params, opt):
    """Params and every state tensor (step counts as numbers: capturable keeps them on the GPU)."""
    out = [p.detach().cpu().clone() for p in params]
    for p in params:
        st = opt.state.get(p, {})
        for k in sorted(st):
            out.append(torch.tensor(float(st[k])) if k == "step" else st[k].detach().cpu().clone())
    return out


def _difference(a, b):
    """None when two snapshots hold the same bits, else which tensor differs and how. NaNs compare
    as values in every dtype (same positions; payload and sign unspecified: a GPU returns the
    canonical NaN, ARCHITECTURE.md section 2); every other element by its bit pattern."""
    if len(a) != len(b):
        return f"{len(a)} tensors vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        why = first_difference(x, y)
        if why is not None:
            return f"snapshot tensor {i}: {why}"
    return None


def _make(dtype, shapes, device, transposed=TRANSPOSED_PARAM):
    gen = torch.Generator().manual_seed(11)
    params = []
    for i, s in enumerate(shapes):
        w = (torch.randn(s[::-1] if i == transposed else s, generator=gen) * 0.5).to(dtype)
        w = w.to(device)
        params.append(torch.nn.Parameter(w.t() if i == transposed else w))
    return params


def _pair(target, dtype, fmt, rnd, opts, shapes=SHAPES, steps=STEPS, nan_at=None, capturable=False,
          transposed=TRANSPOSED_PARAM, make=None):
    """Runs the cuda kernels (on the target) and the reference (on the CPU) side by side on the
    same data, comparing params and every state tensor after every step. Returns the cuda
    optimizer and its params."""
    dev = target.device
    backend = target.capturable if capturable else target.backend
    make = make or (lambda d: _make(dtype, shapes, d, transposed))
    ref_params, gpu_params = make("cpu"), make(dev)
    if transposed is not None and transposed < len(gpu_params):
        assert not gpu_params[transposed].is_contiguous()
    tensor_lr = opts.get("tensor_lr") or capturable
    kw = {k: v for k, v in opts.items() if k not in ("tensor_lr", "grad_scale")}
    kw.setdefault("weight_decay", 0.1)
    common = dict(state_dtype=fmt, param_rounding=rnd, seed=1234, min_int8_numel=0, **kw)
    ref = onepass.AdamW(ref_params, lr=torch.tensor(3e-2) if tensor_lr else 3e-2,
                        backend="reference", **common)
    gpu_lr = torch.tensor(3e-2, device=dev if capturable else "cpu") if tensor_lr else 3e-2
    gpu = onepass.AdamW(gpu_params, lr=gpu_lr, backend=backend, capturable=capturable, **common)
    gen = torch.Generator().manual_seed(12)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(gpu_params, ref_params)):
            if i == TRANSPOSED_GRAD and q.dim() == 2:
                g = torch.randn(q.shape[::-1], generator=gen).to(dtype)
                q.grad, p.grad = g.t(), g.to(dev).t()  # non-contiguous on both sides
            else:
                g = torch.randn(q.shape, generator=gen).to(dtype)
                if nan_at is not None and step == nan_at[0] and i == nan_at[1]:
                    g.view(-1)[nan_at[2]] = float("nan")
                q.grad, p.grad = g, g.to(dev)
        if opts.get("grad_scale"):
            # as torch.amp.GradScaler hands them over: attributes of the optimizer (on the
            # params' device for capturable, where the kernel reads found_inf itself)
            amp_dev = dev if capturable else "cpu"
            skip = 1.0 if step == 2 else 0.0
            ref.grad_scale, ref.found_inf = torch.tensor(1024.0), torch.tensor(skip)
            gpu.grad_scale = torch.tensor(1024.0, device=amp_dev)
            gpu.found_inf = torch.tensor(skip, device=amp_dev)
            for p, q in zip(gpu_params, ref_params):
                p.grad, q.grad = p.grad * 1024, q.grad * 1024
        gpu.step()
        ref.step()
        assert gpu.last_backends == [backend], gpu.last_backends
        why = _difference(_snapshot(gpu_params, gpu), _snapshot(ref_params, ref))
        assert why is None, f"step {step + 1}: {why}"
    return gpu, gpu_params


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("fmt,dtype,rnd", CASES)
def test_lowp_matches_reference_every_step(target, fmt, dtype, rnd, option):
    opt, params = _pair(target, dtype, fmt, rnd, OPTIONS[option])
    # the formats were really used
    st = opt.state[params[0]]
    if fmt == "int8":
        assert st["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in st
        assert opt.state[params[3]]["exp_avg"].dtype == torch.float32  # 1-D: fp32 state
    elif fmt == "bf16":
        assert st["exp_avg"].dtype == torch.bfloat16
    assert ("kahan_comp" in st) == (rnd == "kahan")


@pytest.mark.parametrize("option", ["adamw", "grad_scale"])
@pytest.mark.parametrize("fmt,dtype,rnd", CASES)
def test_capturable_matches_reference(target, fmt, dtype, rnd, option):
    # device step counts: the kernels read them (scalars, random-stream keys) and a second kernel
    # advances them, unless found_inf (read on the device) is set
    opt, params = _pair(target, dtype, fmt, rnd, OPTIONS[option], capturable=True)
    st = opt.state[params[0]]
    assert st["step"].device.type == target.device
    assert float(st["step"]) == (STEPS - 1 if option == "grad_scale" else STEPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int8_nan_gradient_agrees_and_poisons_its_block(target, dtype):
    nan_at = (1, 1, 300)  # step 2, param (3, 1000), row 0, block 1
    opt, params = _pair(target, dtype, "int8", "nearest", {}, nan_at=nan_at)
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        am = opt.state[params[1]][k].cpu()
        assert torch.isnan(am[0, 1]) and not torch.isnan(am[0, 0]) and not torch.isnan(am[1:]).any()


@pytest.mark.parametrize("maps", [("dynamic", "dynamic"), ("power4", "float3"), ("float3", "power4")],
                         ids=lambda m: "/".join(m))
def test_table_search_maps_match_reference(target, maps, monkeypatch):
    # the int8 kernel's general path (code tables and midpoints in shared memory, code_search)
    # for maps other than float3 on both sides
    monkeypatch.setattr(quant, "SIGNED_MAP", maps[0])
    monkeypatch.setattr(quant, "UNSIGNED_MAP", maps[1])
    for dtype, rnd in ((torch.float32, "nearest"), (torch.bfloat16, "kahan")):
        _pair(target, dtype, "int8", rnd, {}, steps=3)


@pytest.mark.parametrize("fmt,rnd", [("bf16", "stochastic"), ("int8", "kahan"), ("int8", "nearest"),
                                     ("bf16", "nearest"), ("fp32", "kahan")])
def test_mixed_dtypes_many_tensors_and_step_counts(target, fmt, rnd):
    # One group of float32, bfloat16 and float16 params (where the rounding allows them): one
    # launch per dtype, 40 tensors (the kernels' tensor search), unaligned views (the element-wise
    # kernel's scalar path). The first param skips step 0, so the batch holds two step counts
    # and two sets of random-stream keys.
    dtypes = [torch.bfloat16] if rnd != "nearest" else [torch.float32, torch.bfloat16, torch.float16]

    def make(device):
        gen = torch.Generator().manual_seed(9)
        out = []
        for j in range(40):
            dt = dtypes[j % len(dtypes)]
            shape = (1 + j % 5, 37 * (j + 1))
            if j % 7 == 3:  # a view at an odd offset: not 16-byte aligned
                base = torch.randn(shape[0] * shape[1] + 3, generator=gen).to(dt).to(device)
                out.append(torch.nn.Parameter(base[3:].view(shape)))
            else:
                out.append(torch.nn.Parameter(torch.randn(shape, generator=gen).to(dt).to(device)))
        return out

    ref_params, gpu_params = make("cpu"), make(target.device)
    common = dict(lr=1e-2, weight_decay=0.1, state_dtype=fmt, param_rounding=rnd, seed=77,
                  min_int8_numel=0)
    gpu = onepass.AdamW(gpu_params, backend=target.backend, **common)
    ref = onepass.AdamW(ref_params, backend="reference", **common)
    for s in range(4):
        for j, (p, q) in enumerate(zip(gpu_params, ref_params)):
            if s == 0 and j == 0:
                p.grad = q.grad = None
                continue
            g = torch.randn(q.shape, generator=torch.Generator().manual_seed(10 * s + j)).to(q.dtype)
            q.grad, p.grad = g, g.to(target.device)
        gpu.step()
        ref.step()
        why = _difference(_snapshot(gpu_params, gpu), _snapshot(ref_params, ref))
        assert why is None, f"step {s + 1}: {why}"


@pytest.mark.parametrize("fmt,rnd", [("int8", "stochastic"), ("bf16", "kahan")])
def test_cuda_graph_replay(target, fmt, rnd):
    if target is not GPU:
        pytest.skip("CUDA graphs need a GPU (the emulation runs the capturable path eagerly: "
                    "test_capturable_matches_reference)")
    # capturable: one captured step replayed with new grads and a scheduled Tensor lr gives the
    # bits of eager capturable steps (the random streams advance with the device step count)
    def make():
        return _make(torch.bfloat16, [(64, 300), (70, 70), (16 * 9 + 5,)], "cuda", transposed=None)

    def grads(params, step):
        gen = torch.Generator().manual_seed(100 + step)
        return [torch.randn(p.shape, generator=gen).to(p.dtype).to("cuda") for p in params]

    common = dict(state_dtype=fmt, param_rounding=rnd, seed=5, min_int8_numel=0, capturable=True,
                  backend="cuda")
    params, eager = make(), make()
    lr = torch.tensor(1e-2, device="cuda")
    opt = onepass.AdamW(params, lr=lr, **common)
    eopt = onepass.AdamW(eager, lr=torch.tensor(1e-2, device="cuda"), **common)
    for p in params:
        p.grad = torch.zeros_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as torch requires before capture
        for p, g in zip(params, grads(params, 0)):
            p.grad.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(s)
    for p, g in zip(eager, grads(eager, 0)):
        p.grad = g
    eopt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(1, 4):
        new_lr = 1e-2 * (0.5 ** step)
        lr.fill_(new_lr)
        eopt.param_groups[0]["lr"].fill_(new_lr)
        for p, g in zip(params, grads(params, step)):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(eager, grads(eager, step)):
            p.grad = g
        eopt.step()
        torch.cuda.synchronize()
        why = _difference(_snapshot(params, opt), _snapshot(eager, eopt))
        assert why is None, f"step {step + 1}: {why}"
    assert float(opt.state[params[0]]["step"]) == 4.0


def _lowp_args(dev, fmt="int8"):
    from onepass import reference

    params = [torch.randn(4, 300, device=dev) for _ in range(2)]
    shape = reference.absmax_shape((4, 300))
    sdt = torch.uint8 if fmt == "int8" else torch.bfloat16
    args = dict(
        params=params, grads=[torch.randn(4, 300, device=dev) for _ in range(2)],
        exp_avgs=[torch.zeros(4, 300, dtype=sdt, device=dev) for _ in range(2)],
        exp_avg_sqs=[torch.zeros(4, 300, dtype=sdt, device=dev) for _ in range(2)],
        max_exp_avg_sqs=[], steps=[torch.zeros(()) for _ in range(2)],
    )
    kw = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              amsgrad=False, maximize=False, decoupled=True, grad_scale=None, found_inf=None,
              state_format=fmt,
              exp_avg_absmaxs=[torch.zeros(shape, device=dev) for _ in range(2)] if fmt == "int8" else [],
              exp_avg_sq_absmaxs=[torch.zeros(shape, device=dev) for _ in range(2)] if fmt == "int8" else [],
              qtables=quant.tables(dev) if fmt == "int8" else None, param_rounding="nearest",
              kahan_comps=[], seed=0)
    return args, kw


@pytest.mark.parametrize("bad,match", [
    ("absmax_shape", "exp_avg_absmaxs\\[1\\] must be a contiguous float32"),
    ("no_tables", "needs qtables"),
    ("state_dtype", "must be Byte"),
    ("amsgrad", "amsgrad needs"),
    ("rounding_fp32", "is for bfloat16 params"),
    ("format", "unknown state format"),
    ("kahan_missing", "one compensation per param"),
])
def test_lowp_op_rejects_bad_batches_and_writes_nothing(target, bad, match):
    dev = target.device
    args, kw = _lowp_args(dev)
    if bad == "absmax_shape":
        kw["exp_avg_absmaxs"][1] = torch.zeros(4, 1, device=dev)
    elif bad == "no_tables":
        kw["qtables"] = None
    elif bad == "state_dtype":
        args["exp_avgs"][1] = torch.zeros(4, 300, device=dev)
    elif bad == "amsgrad":
        kw["amsgrad"] = True
        args["max_exp_avg_sqs"] = [torch.zeros(4, 300, device=dev) for _ in range(2)]
    elif bad == "rounding_fp32":
        kw["param_rounding"] = "stochastic"
    elif bad == "format":
        kw["state_format"] = "int4"
    elif bad == "kahan_missing":
        args["params"] = [p.bfloat16() for p in args["params"]]
        args["grads"] = [g.bfloat16() for g in args["grads"]]
        kw["param_rounding"] = "kahan"
    before = {k: [t.clone() for t in v] for k, v in args.items()}
    before_am = [t.clone() for t in kw["exp_avg_absmaxs"]]
    for op in _lowp_ops(target):
        with pytest.raises(RuntimeError, match=match):
            op(*args.values(), **kw)
    for k, v in args.items():
        assert all(torch.equal(a, b) for a, b in zip(v, before[k])), k
    assert all(torch.equal(a, b) for a, b in zip(kw["exp_avg_absmaxs"], before_am))


def _lowp_ops(target):
    """The check and the step of the target: the registered ops on a GPU, the emulation module's
    entry point (same arguments, check_only) on the CPU."""
    if target is GPU:
        return (torch.ops.onepass.adam_check_lowp, torch.ops.onepass.adam_step_lowp_)
    from onepass.backends import cuda_emu

    step = cuda_emu.build().step
    return tuple(lambda *a, check=check, **k: step(*a, **k, device_steps=False, capturing=False,
                                                   check_only=check) for check in (True, False))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_backend_lists_the_formats():
    cb = BACKENDS["cuda"]
    assert cb.state_formats == ("fp32", "bf16", "int8")
    assert cb.param_roundings == ("nearest", "stochastic", "kahan")
    for key in ("adam_step_lowp_", "adam_check_lowp"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"onepass::{key}", "CUDA"), key
