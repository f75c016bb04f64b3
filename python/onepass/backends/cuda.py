"""The "cuda" backend: csrc/cuda/adam_cuda.cu, one launch per batch and param dtype.

Eager steps call the kernel through the extension's direct binding (cheaper list conversion);
traced code (torch.compile) calls the registered op onepass::adam_step_. With capturable=True
the step counts live on the device and the update can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .base import Backend, Batch
from .cpu import _tracing
from .reference import check_batch


class CudaBackend(Backend):
    name = "cuda"
    checks_before_writing = True  # the kernel's host code checks the whole batch first

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if not _ops.HAS_EXT:
            return f"the compiled extension could not be loaded ({_ops.EXT_ERROR})"
        if not hasattr(_ops._C, "adam_step_cuda"):
            return ("the extension was built without CUDA kernels (torch without CUDA, or no "
                    "nvcc / CUDA_HOME when it was built)")
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors only, not {device.type}"
        return None

    def validate(self, batch: Batch) -> None:
        check_batch(batch)

    def step(self, batch: Batch) -> None:
        lr = batch.lr
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        fn = torch.ops.onepass.adam_step_ if _tracing() else _ops._C.adam_step_cuda
        fn(batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs,
           batch.steps, lr=0.0 if lr_tensor is not None else float(lr), lr_tensor=lr_tensor,
           beta1=batch.beta1, beta2=batch.beta2, eps=batch.eps, weight_decay=batch.weight_decay,
           amsgrad=batch.amsgrad, maximize=batch.maximize, decoupled=batch.decoupled,
           grad_scale=batch.grad_scale, found_inf=batch.found_inf)
