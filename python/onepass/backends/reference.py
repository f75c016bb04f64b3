"""The "reference" backend: python/onepass/reference.py, one tensor at a time, on any device."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..reference import PARAM_DTYPES
from .base import Backend, Batch



_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
              torch.float16: "Half", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
              torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
              torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def c10_name(dtype: torch.dtype) -> str:
    """A dtype as the C++ checks print it (at::ScalarType's name), so that a fault reads the
    same on every backend."""
    return _C10_NAMES.get(dtype, str(dtype))


def storage_holds(t: torch.Tensor) -> bool:
    """Whether t's storage holds every element t addresses (the C++ twin: storage_holds in
    csrc/onepass_ops.h). A storage can shrink under its tensor in place: FSDP resizes an
    unsharded grad's storage to 0 bytes, and a state tensor's can be resized by hand."""
    n = t.numel()
    if n == 0:
        return True
    nbytes = t.untyped_storage().nbytes()
    last = t.storage_offset() + (n - 1 if t.is_contiguous() else
                                 sum((d - 1) * s for d, s in zip(t.shape, t.stride())))
    return (last + 1) * t.element_size() <= nbytes


def check_holds(t: torch.Tensor, name: str, i: int) -> None:
    """Refuses a tensor of the batch whose storage no longer holds it (check_holds in C++)."""
    if not storage_holds(t):
        raise RuntimeError(
            f"onepass: {name}[{i}] has {t.untyped_storage().nbytes()} bytes of storage, too few "
            f"for its shape [{', '.join(map(str, t.shape))}] (its storage was resized or freed "
            "in place)")


def check_count(t: float, i: int) -> None:
    """Refuses a step count a step cannot advance (check_step_value in C++): float32 counts stop
    at 2**24 as torch's do, float64 ones at 2**53."""
    if not (0.0 <= t <= 2.0**53 and t == math.floor(t)):
        raise RuntimeError(f"onepass: steps[{i}] holds {t}, not a whole number in [0, 2**53] "
                           "(a step count)")


def check_batch(batch: Batch, check_state: bool = True) -> None:
    """The checks every backend makes before writing anything (the C++ twin: validate_batch).

    ``check_state=False`` skips the moments, for a caller that knows they were checked since the
    state last changed (the triton backend, whose state lists come from the optimizer's cache).
    """
    n = len(batch.params)
    lists = (batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.steps)
    if any(len(x) != n for x in lists) or (batch.amsgrad and len(batch.max_exp_avg_sqs) != n):
        raise ValueError("onepass: the lists of a batch must have one entry per param")
    strided = torch.strided
    for i, (p, g) in enumerate(zip(batch.params, batch.grads)):
        # one combined test per param on the fast path; the messages below only on failure
        if not (g.layout is strided and g.dtype == p.dtype and g.shape == p.shape
                and g.device == p.device and p.dtype in PARAM_DTYPES):
            _bad_pair(i, p, g)
        check_holds(p, "params", i)
        check_holds(g, "grads", i)
    if not check_state:
        return
    for i, st in enumerate(batch.steps):
        if isinstance(st, torch.Tensor):
            if st.numel() != 1 or st.dtype not in (torch.float32, torch.float64):
                # (validate_batch's words: one wording whatever the backend)
                raise RuntimeError(
                    f"onepass: steps[{i}] must be a one-element float32/float64 tensor on the "
                    f"CPU or the params' device, got {c10_name(st.dtype)} with {st.numel()} "
                    f"elements on {st.device}")
            check_holds(st, "steps", i)
            if st.device.type == "cpu":  # (a device count: no sync, as in C++)
                check_count(float(st.item()), i)
    fmt = batch.state_format
    if fmt not in reference.STATE_FORMATS:
        raise ValueError(f"onepass: unknown state format {fmt!r}")
    if fmt != "fp32" and batch.amsgrad:
        raise ValueError("onepass: amsgrad needs state_dtype='fp32'")
    if batch.param_rounding not in reference.PARAM_ROUNDINGS:
        raise ValueError(f"onepass: unknown param_rounding {batch.param_rounding!r}")
    int8 = fmt == "int8"
    kahan = batch.param_rounding == "kahan"
    if (int8 and (len(batch.exp_avg_absmaxs) != n or len(batch.exp_avg_sq_absmaxs) != n
                  or batch.qtables is None)) or (kahan and len(batch.kahan_comps) != n):
        raise ValueError("onepass: int8 state needs absmax lists and qtables, kahan rounding "
                         "a compensation per param")
    for i, p in enumerate(batch.params):
        math = reference.math_dtype(p.dtype)
        if fmt != "fp32" and (math != torch.float32):
            raise RuntimeError(f"onepass: {fmt} state is for float32/bf16/fp16 params, got "
                               f"{c10_name(p.dtype)}")
        if batch.param_rounding != "nearest" and p.dtype != torch.bfloat16:
            raise RuntimeError(f"onepass: param_rounding={batch.param_rounding!r} is for bfloat16 "
                               f"params, got {c10_name(p.dtype)}")
        sdt = {"fp32": math, "bf16": torch.bfloat16, "int8": torch.uint8}[fmt]
        _check_state(batch.exp_avgs[i], p, sdt, "exp_avgs", i, int8)
        _check_state(batch.exp_avg_sqs[i], p, sdt, "exp_avg_sqs", i, int8)
        if int8:
            _check_absmax(batch.exp_avg_absmaxs[i], p, "exp_avg_absmaxs", i)
            _check_absmax(batch.exp_avg_sq_absmaxs[i], p, "exp_avg_sq_absmaxs", i)
        if kahan:
            c = batch.kahan_comps[i]
            if not (c.device == p.device and c.dtype == torch.bfloat16 and c.shape == p.shape
                    and c.layout is strided):
                raise RuntimeError(
                    f"onepass: kahan_comps[{i}] must be a bfloat16 tensor of shape {_dims(p.shape)} "
                    f"on {p.device}, got {c10_name(c.dtype)} {_dims(c.shape)} on {c.device}")
            check_holds(c, "kahan_comps", i)
        if batch.amsgrad:
            _check_state(batch.max_exp_avg_sqs[i], p, math, "max_exp_avg_sqs", i, False)


# The messages and order of csrc/batch_checks.cpp (check_state, check_absmax, check_grad), so that
# a fault reads the same, and raises the same type, on every backend.
def _dims(shape) -> str:
    """A shape as c10 prints one: [70, 60]."""
    return "[" + ", ".join(map(str, shape)) + "]"


def _check_state(s: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, name: str, i: int,
                 contiguous: bool) -> None:
    if s.device != p.device:
        raise RuntimeError(f"onepass: {name}[{i}] is on {s.device} but its param is on {p.device}")
    if s.dtype != dtype:
        raise RuntimeError(f"onepass: {name}[{i}] must be {c10_name(dtype)} for a "
                           f"{c10_name(p.dtype)} param, got {c10_name(s.dtype)}")
    if s.shape != p.shape:
        raise RuntimeError(f"onepass: {name}[{i}] has shape {_dims(s.shape)} but its param has "
                           f"shape {_dims(p.shape)}")
    check_holds(s, name, i)
    if contiguous and not s.is_contiguous():
        raise RuntimeError(f"onepass: {name}[{i}] of int8 state must be contiguous (strides "
                           f"{_dims(s.stride())})")


def _check_absmax(s: torch.Tensor, p: torch.Tensor, name: str, i: int) -> None:
    shape = torch.Size(reference.absmax_shape(p.shape))
    if not (s.device == p.device and s.dtype == torch.float32 and s.shape == shape
            and s.is_contiguous()):
        raise RuntimeError(
            f"onepass: {name}[{i}] must be a contiguous float32 tensor of shape {_dims(shape)} on "
            f"{p.device}, got {c10_name(s.dtype)} {_dims(s.shape)} on {s.device}")
    check_holds(s, name, i)


def _bad_pair(i: int, p: torch.Tensor, g: torch.Tensor) -> None:
    if p.dtype not in PARAM_DTYPES:
        raise RuntimeError(f"onepass: params[{i}] is {c10_name(p.dtype)}; params must be float32, "
                           "float64, bfloat16 or float16")
    if g.layout != torch.strided:
        raise RuntimeError(
            f"onepass: grads[{i}] is sparse; onepass supports dense gradients only "
            "(use torch.optim.SparseAdam)"
        )
    if g.dtype != p.dtype:
        raise RuntimeError(f"onepass: grads[{i}] is {c10_name(g.dtype)} but its param is "
                           f"{c10_name(p.dtype)}")
    if g.device != p.device:
        raise RuntimeError(f"onepass: grads[{i}] is on {g.device} but its param on {p.device}")
    raise RuntimeError(
        f"onepass: grads[{i}] has shape {_dims(g.shape)} but its param has shape {_dims(p.shape)}"
    )


class ReferenceBackend(Backend):
    name = "reference"
    state_formats = reference.STATE_FORMATS
    param_roundings = reference.PARAM_ROUNDINGS
    statistics = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return None

    def validate(self, batch: Batch) -> None:
        check_batch(batch)

    def step(self, batch: Batch) -> None:
        reference.adam_step_batch_(
            batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs,
            batch.steps, lr=batch.lr, beta1=batch.beta1, beta2=batch.beta2, eps=batch.eps,
            weight_decay=batch.weight_decay, amsgrad=batch.amsgrad, maximize=batch.maximize,
            decoupled=batch.decoupled, grad_scale=batch.grad_scale, found_inf=batch.found_inf,
            state_format=batch.state_format, exp_avg_absmaxs=batch.exp_avg_absmaxs,
            exp_avg_sq_absmaxs=batch.exp_avg_sq_absmaxs, param_rounding=batch.param_rounding,
            kahan_comps=batch.kahan_comps, seed=batch.seed, qtables=batch.qtables,
            stats=batch.stats,
        )
