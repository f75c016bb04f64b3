"""The "cuda" backend: csrc/cuda/adam_cuda.cu, one launch per batch and param dtype.

fp32 state with nearest rounding: eager steps call the kernel through the extension's direct
binding (cheaper list conversion); traced code (torch.compile) calls the registered op
onepass::adam_step_. Low precision (bf16 / int8 state, stochastic / Kahan bf16 params;
reference.py "Storage") goes through the registered op onepass::adam_step_lowp_ in both cases.
With capturable=True the step counts live on the device and the update can be captured in a
CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .base import Backend, Batch, SkippedCounts, defers_found_inf, plan_step_kwargs
from .cpu import CpuBackend, _lowp, _tracing
from .reference import check_batch


class CudaBackend(Backend):
    name = "cuda"
    checks_before_writing = True  # the kernel's host code checks the whole batch first
    takes_plan = True
    state_formats = ("fp32", "bf16", "int8")
    param_roundings = ("nearest", "stochastic", "kahan")

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        # Naming the backend builds the CUDA kernels on first use when the installed extension
        # lacks them (_ops.cuda_module); the reason says why that cannot work here.
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, not {device.type}"
        try:
            _ops.cuda_module()
        except RuntimeError as exc:
            return str(exc)
        return None

    def auto_reason(self, device: torch.device) -> Optional[str]:
        # "auto" never starts a build of minutes: it takes the prebuilt kernels or moves on to
        # the next backend of its order (backends/__init__.py, _AUTO_ORDER).
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, not {device.type}"
        if _ops.cuda_module(build=False) is None:
            return ("the installed extension has no CUDA kernels (name backend='cuda' to build "
                    "them on first use)")
        return None

    def validate(self, batch: Batch) -> None:
        if batch.plan is not None and not _tracing():
            _step_plan(batch, check_only=True)
            return
        check_batch(batch)

    def step(self, batch: Batch) -> None:
        if batch.plan is not None and not _tracing():
            _step_plan(batch, check_only=False)
            return
        if _lowp(batch):
            if not _tracing():
                _ops.cuda_module()  # registers the CUDA kernels of the op (a JIT add-on, maybe)
            CpuBackend._call(torch.ops.onepass.adam_step_lowp_, batch)  # same arguments
            return
        lr = batch.lr
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        fn = torch.ops.onepass.adam_step_ if _tracing() else _ops.cuda_module().adam_step_cuda
        fn(batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs,
           batch.steps, lr=0.0 if lr_tensor is not None else float(lr), lr_tensor=lr_tensor,
           beta1=batch.beta1, beta2=batch.beta2, eps=batch.eps, weight_decay=batch.weight_decay,
           amsgrad=batch.amsgrad, maximize=batch.maximize, decoupled=batch.decoupled,
           grad_scale=batch.grad_scale, found_inf=batch.found_inf)


def _step_plan(batch: Batch, check_only: bool) -> None:
    """The batch through the optimizer's plan: the CUDA module's host step on the lists the plan
    holds and the grads it read in C++ (checks only with check_only)."""
    plan, part = batch.plan
    defer = defers_found_inf(batch)
    _ops.cuda_module().step_plan(plan.address(), part, check_only=check_only,
                                 defer_found_inf=defer, **plan_step_kwargs(batch))
    if defer and not check_only:  # (the kernels skip on found_inf; the host counts moved)
        batch.deferred.append(SkippedCounts(batch.found_inf, batch.steps))
