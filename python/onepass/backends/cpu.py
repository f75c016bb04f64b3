"""The "cpu" backend: csrc/cpu/ (adam_cpu.cpp's entry points) through torch.ops.onepass.adam_step_ (fp32 state,
nearest rounding) and torch.ops.onepass.adam_step_lowp_ (bf16/int8 state, stochastic/Kahan bf16
params).

One op call per batch updates every tensor of the batch in one parallel region.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .base import Backend, Batch, plan_step_kwargs


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class CpuBackend(Backend):
    name = "cpu"
    checks_before_writing = True
    state_formats = ("fp32", "bf16", "int8")
    param_roundings = ("nearest", "stochastic", "kahan")
    statistics = True
    takes_plan = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if not _ops.HAS_EXT:
            return f"the compiled extension could not be loaded ({_ops.EXT_ERROR})"
        if device.type != "cpu":
            return f"the cpu backend runs CPU tensors only, not {device.type}"
        return None

    def validate(self, batch: Batch) -> None:
        if batch.plan is not None and not _tracing():
            _plan_call(batch, check_only=True)
            return
        if _lowp(batch):
            op = torch.ops.onepass.adam_check_lowp if _tracing() else _ops._C.adam_check_lowp_cpu
        else:
            op = torch.ops.onepass.adam_check if _tracing() else _ops._C.adam_check_cpu
        self._call(op, batch)

    def step(self, batch: Batch) -> None:
        if batch.plan is not None and not _tracing():
            _plan_call(batch, check_only=False)
            return
        # Eager: the direct binding (cheaper list conversion); traced: the registered custom op,
        # which torch.compile sees as one opaque in-place op. Same C++ function either way.
        if batch.stats is not None:
            op = torch.ops.onepass.adam_step_stats_ if _tracing() else _ops._C.adam_step_stats_cpu
        elif _lowp(batch):
            op = torch.ops.onepass.adam_step_lowp_ if _tracing() else _ops._C.adam_step_lowp_cpu
        else:
            op = torch.ops.onepass.adam_step_ if _tracing() else _ops._C.adam_step_cpu
        self._call(op, batch, stats=batch.stats is not None)

    @staticmethod
    def _call(op, batch: Batch, stats: bool = False) -> None:
        lr = batch.lr
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        extra = {}
        if stats:
            extra["stats"] = batch.stats
        if _lowp(batch) or stats:
            extra.update(
                state_format=batch.state_format, exp_avg_absmaxs=batch.exp_avg_absmaxs,
                exp_avg_sq_absmaxs=batch.exp_avg_sq_absmaxs, qtables=batch.qtables,
                param_rounding=batch.param_rounding, kahan_comps=batch.kahan_comps,
                seed=int(batch.seed),
            )
        op(
            batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs,
            batch.steps, lr=0.0 if lr_tensor is not None else float(lr), lr_tensor=lr_tensor,
            beta1=batch.beta1, beta2=batch.beta2, eps=batch.eps, weight_decay=batch.weight_decay,
            amsgrad=batch.amsgrad, maximize=batch.maximize, decoupled=batch.decoupled,
            grad_scale=batch.grad_scale, found_inf=batch.found_inf, **extra,
        )


def _plan_call(batch: Batch, check_only: bool) -> None:
    """The batch through the optimizer's cached plan: the tensors are already in C++, and the
    CPU kernels' kept walk runs them (or only checks them)."""
    plan, part = batch.plan
    plan.step(part, stats=batch.stats, check_only=check_only, **plan_step_kwargs(batch))


def _lowp(batch: Batch) -> bool:
    """Whether the batch needs adam_step_lowp_ (anything but fp32 state with nearest rounding)."""
    return batch.state_format != "fp32" or batch.param_rounding != "nearest"
