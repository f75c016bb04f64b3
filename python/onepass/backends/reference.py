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
    for i, p in enumerate(batch.params):
        math = reference.math_dtype(p.dtype)
        states = [("exp_avgs", batch.exp_avgs[i]), ("exp_avg_sqs", batch.exp_avg_sqs[i])]
        if batch.amsgrad:
            states.append(("max_exp_avg_sqs", batch.max_exp_avg_sqs[i]))
        for name, s in states:
            if s.dtype != math or s.shape != p.shape or s.device != p.device:
                raise RuntimeError(
                    f"onepass: {name}[{i}] must be a {math} tensor of shape {tuple(p.shape)} on "
                    f"{p.device}, got {s.dtype} {tuple(s.shape)} on {s.device}"
                )


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
        )
