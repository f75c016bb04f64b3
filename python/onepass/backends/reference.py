"""The "reference" backend: python/onepass/reference.py, one tensor at a time, on any device."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..reference import PARAM_DTYPES
from .base import Backend, Batch



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
    if not check_state:
        return
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
            raise ValueError(f"onepass: {fmt} state is for float32/bf16/fp16 params, got {p.dtype}")
        if batch.param_rounding != "nearest" and p.dtype != torch.bfloat16:
            raise ValueError(f"onepass: param_rounding={batch.param_rounding!r} is for bfloat16 "
                             f"params, got {p.dtype}")
        sdt = {"fp32": math, "bf16": torch.bfloat16, "int8": torch.uint8}[fmt]
        states = [("exp_avgs", batch.exp_avgs[i], sdt, p.shape),
                  ("exp_avg_sqs", batch.exp_avg_sqs[i], sdt, p.shape)]
        if batch.amsgrad:
            states.append(("max_exp_avg_sqs", batch.max_exp_avg_sqs[i], sdt, p.shape))
        if int8:
            shape = torch.Size(reference.absmax_shape(p.shape))
            states += [("exp_avg_absmaxs", batch.exp_avg_absmaxs[i], torch.float32, shape),
                       ("exp_avg_sq_absmaxs", batch.exp_avg_sq_absmaxs[i], torch.float32, shape)]
        if kahan:
            states.append(("kahan_comps", batch.kahan_comps[i], p.dtype, p.shape))
        for name, s, dtype, shape in states:
            if s.dtype != dtype or s.shape != shape or s.device != p.device:
                raise RuntimeError(
                    f"onepass: {name}[{i}] must be a {dtype} tensor of shape {tuple(shape)} on "
                    f"{p.device}, got {s.dtype} {tuple(s.shape)} on {s.device}"
                )
            if int8 and name != "kahan_comps" and not s.is_contiguous():
                raise RuntimeError(f"onepass: {name}[{i}] of int8 state must be contiguous")


def _bad_pair(i: int, p: torch.Tensor, g: torch.Tensor) -> None:
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"onepass: params must be float32, float64, bfloat16 or float16, got {p.dtype}")
    if g.layout != torch.strided:
        raise RuntimeError(
            f"onepass: grads[{i}] is sparse; onepass supports dense gradients only "
            "(use torch.optim.SparseAdam)"
        )
    if g.dtype != p.dtype:
        raise RuntimeError(f"onepass: grads[{i}] is {g.dtype} but its param is {p.dtype}")
    if g.device != p.device:
        raise RuntimeError(f"onepass: grads[{i}] is on {g.device} but its param on {p.device}")
    raise RuntimeError(
        f"onepass: grads[{i}] has shape {tuple(g.shape)} but its param has shape {tuple(p.shape)}"
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
