"""The "triton" backend: triton_kernels/adam.py, one launch per batch and param dtype.

Runs CUDA tensors on a GPU, and CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
how CI tests the kernel without a GPU). The host builds three small tables per launch (addresses,
bias corrections, block starts) and copies them to the device in one transfer; the learning rate,
when a Tensor, and the GradScaler's scale are read by the kernel on the device.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import reference
from .base import Backend, Batch
from .reference import check_batch

# Elements per program. 2048 fp32 elements is 56 KB of traffic per program: enough bytes in
# flight per SM on an H100 with 8 warps; the interpreter runs fewer, larger programs faster.
BLOCK = 2048
NUM_WARPS = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_kernels = None


def _load():
    global _kernels
    if _kernels is None:
        from onepass.triton_kernels import adam  # imports triton

        _kernels = adam
    return _kernels


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64,
            torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreting():
            return None
        if device.type == "cpu":
            return "triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        return f"triton does not run {device.type} tensors here"

    def validate(self, batch: Batch) -> None:
        check_batch(batch)

    def step(self, batch: Batch) -> None:
        if batch.found_inf is not None and bool(batch.found_inf.item() != 0):
            return  # AMP overflow: nothing changes, not even the step count
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, p in enumerate(batch.params):
            by_dtype.setdefault(p.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            self._launch(batch, dtype, idx)

    def _launch(self, batch: Batch, dtype: torch.dtype, idx: List[int]) -> None:
        kernels = _load()
        device = batch.params[idx[0]].device
        keep = []           # temporaries that must live until the launch is queued
        write_back = []     # (param, dense working copy)
        rows, frows, starts = [], [], [0]
        bc_cache: Dict[int, Tuple[float, float]] = {}
        math_dt = reference.math_dtype(dtype)
        for i in idx:
            st = batch.steps[i]
            st.add_(1)
            t = int(st.item())
            if batch.params[i].numel() == 0:
                continue
            if t not in bc_cache:
                s = reference.step_scalars(t, 1.0, batch.beta1, batch.beta2, batch.eps, 0.0, True)
                # bc1 = lr / step_size with lr = 1: the kernel divides its own lr by it
                bc1 = 1.0 - reference.pow_int(batch.beta1, t)
                bc_cache[t] = (bc1, s.rounded(math_dt).bc2_sqrt)
            p = batch.params[i]
            if not p.is_contiguous():
                pc = p.contiguous()
                write_back.append((p, pc))
                p = pc
            g = batch.grads[i]
            if g.stride() != p.stride() or not g.is_contiguous():
                g = g.contiguous() if p.is_contiguous() else torch.empty_like(p).copy_(g)
            keep += [p, g]
            m, v = batch.exp_avgs[i], batch.exp_avg_sqs[i]
            vm = batch.max_exp_avg_sqs[i] if batch.amsgrad else m
            rows.append([p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vm.data_ptr(), p.numel()])
            frows.append(bc_cache[t])
            starts.append(starts[-1] + math.ceil(p.numel() / BLOCK))
        if not rows:
            return
        lr = batch.lr
        lr_tensor = isinstance(lr, torch.Tensor)
        hp = [0.0 if lr_tensor else float(lr), batch.beta1, batch.beta2, batch.eps, batch.weight_decay]
        itab = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        ftab = torch.tensor(frows, dtype=torch.float64).to(device, non_blocking=True)
        stab = torch.tensor(starts, dtype=torch.int64).to(device, non_blocking=True)
        hpt = torch.tensor(hp, dtype=torch.float64).to(device, non_blocking=True)
        lr_arg = lr.to(device) if lr_tensor else hpt
        gs_arg = batch.grad_scale.to(device) if batch.grad_scale is not None else hpt
        n = len(rows)
        grid = (starts[-1],)
        kernels.adam_kernel[grid](
            itab, ftab, stab, hpt, lr_arg, gs_arg, n,
            N_SEARCH=max(1, (n - 1).bit_length()), P_DTYPE=_tl_dtype(dtype), MATH=_tl_dtype(math_dt),
            BLOCK=BLOCK, AMSGRAD=bool(batch.amsgrad), MAXIMIZE=bool(batch.maximize),
            COUPLED=not batch.decoupled, SCALED=batch.grad_scale is not None, LR_TENSOR=lr_tensor,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
        for p, pc in write_back:
            p.copy_(pc)
        del keep
