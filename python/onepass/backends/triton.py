"""The "triton" backend: triton_kernels/adam.py, one launch per batch and param dtype.

Runs CUDA tensors on a GPU, and CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
how CI tests the kernel without a GPU). The host builds three small tables per launch (addresses,
bias corrections, block starts) and copies them to the device in one transfer; the learning rate,
when a Tensor, and the GradScaler's scale are read by the kernel on the device.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

from .. import _ops, reference
from .base import Backend, Batch
from .reference import _bad_pair, check_batch

# (elements per program, warps). The default, 2048 fp32 elements with 8 warps, is 56 KB of
# traffic per program; it ran the `huge` case at the copy ceiling on an H100. On a GPU the first
# step measures CONFIGS once per device name on scratch buffers (the real update is in place, so
# triton.autotune, which reruns the kernel on its arguments, cannot be used) and keeps the fastest.
BLOCK = 2048
NUM_WARPS = 8
CONFIGS = ((1024, 4), (2048, 8), (4096, 8), (4096, 16))
_tuned: Dict[str, Tuple[int, int]] = {}


def config_for(device: torch.device) -> Tuple[int, int]:
    """(BLOCK, num_warps) for ``device``: measured once per GPU model, the default elsewhere or
    when ONEPASS_TRITON_TUNE=0."""
    if device.type != "cuda" or os.environ.get("ONEPASS_TRITON_TUNE") == "0":
        return BLOCK, NUM_WARPS
    key = torch.cuda.get_device_name(device)
    if key not in _tuned:
        try:
            _tuned[key] = _tune(device)
        except Exception:  # noqa: BLE001 - tuning is an optimisation; never fail a step on it
            _tuned[key] = (BLOCK, NUM_WARPS)
    return _tuned[key]


def _tune(device: torch.device, numel: int = 1 << 24, reps: int = 10) -> Tuple[int, int]:
    kernels = _load()
    import triton.language as tl

    buf = torch.rand(4, numel, device=device)  # p, g, m, v of one fp32 tensor (256 MB)
    best, best_ms = (BLOCK, NUM_WARPS), float("inf")
    hpt = torch.tensor([1e-4, 0.9, 0.999, 1e-8, 0.0], dtype=torch.float64, device=device)
    ftab = torch.tensor([[0.1, 0.03]], dtype=torch.float64, device=device)
    itab = torch.tensor([[buf[0].data_ptr(), buf[1].data_ptr(), buf[2].data_ptr(), buf[3].data_ptr(),
                          buf[2].data_ptr(), numel]], dtype=torch.int64, device=device)
    for block, warps in CONFIGS:
        grid = -(-numel // block)
        starts = torch.tensor([0, grid], dtype=torch.int64, device=device)

        def launch():
            kernels.adam_kernel[(grid,)](
                itab, ftab, starts, hpt, hpt, hpt, 1, N_SEARCH=1, P_DTYPE=tl.float32,
                MATH=tl.float32, BLOCK=block, AMSGRAD=False, MAXIMIZE=False, COUPLED=False,
                SCALED=False, LR_TENSOR=False, num_warps=warps, enable_fp_fusion=False)

        launch()  # compile and warm up
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = sorted(times)[len(times) // 2]
        if ms < best_ms:
            best, best_ms = (block, warps), ms
    return best


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


def _bump_steps(steps: List[torch.Tensor]) -> List[int]:
    """step += 1 for every param; the new counts. The C++ helper when built (~20 ns a tensor),
    else torch ops (~3.5 us a tensor on a 2-core machine)."""
    if _ops.HAS_EXT:
        return _ops._C.bump_steps(steps)
    torch._foreach_add_(steps, 1.0)
    try:
        return [int(x) for x in torch.stack(steps).tolist()]
    except RuntimeError:  # float32 and float64 step tensors mixed
        return [int(s.item()) for s in steps]


def _pair_table(params: List[torch.Tensor], grads: List[torch.Tensor]) -> torch.Tensor:
    """Checks the (param, grad) pairs and gives int64 [n, 3]: param address, grad address,
    flags (1: param contiguous, 2: grad contiguous). Raises before anything is written."""
    if _ops.HAS_EXT:
        return _ops._C.pair_table(params, grads)
    rows = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not (g.layout is torch.strided and g.dtype == p.dtype and g.shape == p.shape
                and g.device == p.device):
            _bad_pair(i, p, g)
        rows.append([p.data_ptr(), g.data_ptr(), int(p.is_contiguous()) | 2 * int(g.is_contiguous())])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


class _Plan:
    """What a launch needs that does not change while the batch's state lists stay the same:
    per param dtype, the indices of the non-empty params, the moments' addresses and numels, and
    the block starts (already on the device)."""

    def __init__(self, batch: Batch):
        self.block, self.warps = config_for(batch.device)
        self.groups = []
        by_dtype: Dict[torch.dtype, List[int]] = {}
        for i, p in enumerate(batch.params):
            if p.numel():
                by_dtype.setdefault(p.dtype, []).append(i)
        device = batch.device
        for dtype, idx in by_dtype.items():
            rows, starts = [], [0]
            for i in idx:
                m, v = batch.exp_avgs[i], batch.exp_avg_sqs[i]
                vm = batch.max_exp_avg_sqs[i] if batch.amsgrad else m
                rows.append([0, 0, m.data_ptr(), v.data_ptr(), vm.data_ptr(), m.numel()])
                starts.append(starts[-1] + -(-m.numel() // self.block))
            static = torch.tensor(rows, dtype=torch.int64)
            self.groups.append((dtype, torch.tensor(idx, dtype=torch.int64), idx, static,
                                torch.tensor(starts, dtype=torch.int64).to(device), starts[-1]))


class TritonBackend(Backend):
    name = "triton"
    checks_before_writing = True  # step() checks its batch before the first write

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
        # Moments are re-checked only when the state lists are new (no plan yet): while they are
        # the same objects, no state dict was written (the optimizer's cache says so).
        check_batch(batch, check_state="triton" not in batch.scratch)

    def step(self, batch: Batch) -> None:
        if batch.found_inf is not None and bool(batch.found_inf.item() != 0):
            return  # AMP overflow: nothing changes, not even the step count
        plan = batch.scratch.get("triton")
        if plan is None:
            check_batch(batch)  # new state lists: check the moments once
            plan = _Plan(batch)
        pairs = _pair_table(batch.params, batch.grads)  # checks the grads of this step
        batch.scratch["triton"] = plan
        counts = _bump_steps(batch.steps)  # the first write
        for group in plan.groups:
            self._launch(batch, group, pairs, counts, plan.block, plan.warps)

    def _launch(self, batch: Batch, group, pairs: torch.Tensor, counts: List[int], block: int,
                warps: int) -> None:
        dtype, idx_t, idx, static, starts, grid = group
        kernels = _load()
        device = batch.device
        math_dt = reference.math_dtype(dtype)
        table = static.clone()
        mine = pairs.index_select(0, idx_t) if len(idx) != len(pairs) else pairs
        table[:, 0:2] = mine[:, 0:2]
        keep = []         # temporaries that must live until the launch is queued
        write_back = []   # (tensor, contiguous working copy)
        odd = (mine[:, 2] != 3).nonzero().flatten().tolist()
        for row in odd:  # rare: a non-contiguous param or grad
            i = idx[row]
            if not batch.params[i].is_contiguous():
                # Run on contiguous copies of param, grad and moments (one element order for
                # all of them, whatever the layouts), then copy back.
                p, g = self._contiguous_copies(batch, i, table, row, write_back)
            else:
                g = batch.grads[i].contiguous()
                p = batch.params[i]
            keep += [p, g]
            table[row, 0] = p.data_ptr()
            table[row, 1] = g.data_ptr()
        # Bias corrections per param from its own step count (usually one value for all).
        bc: Dict[int, Tuple[float, float]] = {}

        def corrections(t: int) -> Tuple[float, float]:
            if t not in bc:
                bc1 = 1.0 - reference.pow_int(batch.beta1, t)  # the kernel computes lr / bc1
                bc2 = reference.step_scalars(t, 1.0, batch.beta1, batch.beta2, 0.0, 0.0, True)
                # Only bc2_sqrt is needed rounded (StepScalars.rounded would round all nine:
                # ~12 us of the ~40 us host path of a gpt2 step).
                bc[t] = (bc1, reference.round_scalar(bc2.bc2_sqrt, math_dt))
            return bc[t]

        if counts.count(counts[0]) == len(counts):
            ftab = torch.tensor([corrections(counts[0])], dtype=torch.float64).expand(len(idx), 2)
        else:
            ftab = torch.tensor([corrections(counts[i]) for i in idx], dtype=torch.float64)
        lr = batch.lr
        lr_tensor = isinstance(lr, torch.Tensor)
        hp = [0.0 if lr_tensor else float(lr), batch.beta1, batch.beta2, batch.eps, batch.weight_decay]
        # One host->device transfer for the three per-step tables (int64 bits carried as float64),
        # from pinned memory so it does not wait for the previous step's kernel.
        packed = torch.cat([table.view(torch.float64).reshape(-1),
                            ftab.reshape(-1),
                            torch.tensor(hp, dtype=torch.float64)])
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        n = len(idx)
        itab = packed[: 6 * n].view(torch.int64)
        ftab_d = packed[6 * n: 8 * n]
        hpt = packed[8 * n:]
        lr_arg = lr.to(device) if lr_tensor else hpt
        gs_arg = batch.grad_scale.to(device) if batch.grad_scale is not None else hpt
        kernels.adam_kernel[(grid,)](
            itab, ftab_d, starts, hpt, lr_arg, gs_arg, n,
            N_SEARCH=max(1, (n - 1).bit_length()), P_DTYPE=_tl_dtype(dtype), MATH=_tl_dtype(math_dt),
            BLOCK=block, AMSGRAD=bool(batch.amsgrad), MAXIMIZE=bool(batch.maximize),
            COUPLED=not batch.decoupled, SCALED=batch.grad_scale is not None, LR_TENSOR=lr_tensor,
            num_warps=warps, enable_fp_fusion=False,
        )
        for t, tc in write_back:
            t.copy_(tc)
        del keep

    @staticmethod
    def _contiguous_copies(batch: Batch, i: int, table: torch.Tensor, row: int, write_back: list):
        p = batch.params[i].contiguous()
        g = batch.grads[i].contiguous()
        write_back.append((batch.params[i], p))
        moments = [batch.exp_avgs, batch.exp_avg_sqs] + ([batch.max_exp_avg_sqs] if batch.amsgrad else [])
        for col, lst in zip((2, 3, 4), moments):
            s = lst[i]
            sc = s.contiguous()
            if sc.data_ptr() != s.data_ptr():
                write_back.append((s, sc))
            table[row, col] = sc.data_ptr()
        if not batch.amsgrad:
            table[row, 4] = table[row, 2]
        return p, g
