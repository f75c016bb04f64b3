"""The "triton" backend: triton_kernels/adam.py, one launch per batch and param dtype (and
triton_kernels/stats.py for the statistics' sums).

State formats fp32, bf16 (adam_kernel) and int8 (adam_int8_kernel); bf16 params may be rounded
to nearest, stochastically or with a Kahan compensation (reference.py, "Storage").

Fused statistics (Batch.stats, reference.update_statistics): the update kernels, launched with
STATS, write every chunk's partial sums (float64) to a scratch buffer of the plan; two more
launches sum them into batch.stats: stats_group_kernel (a program per group of
reference.STATS_GROUP consecutive chunks of a param) sums each group by the halving tree into a
second scratch buffer, and stats_sum_kernel (a program per param) adds each param's group sums in
order. The tables of both are made once per plan. No host sync. With STATS a program of
adam_kernel covers STATS_CHUNKS whole chunks, row by row (reference.chunk_partials); the int8
kernel's blocks are the chunks.

Runs CUDA tensors on a GPU, and CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
how CI tests the kernel without a GPU). What stays the same between steps (state addresses,
sizes, block starts, each launch's compile-time arguments) is made once per plan (_Plan); a
step's table of each launch (this step's param and grad addresses, bias corrections and keys of
each count, the scalars) is made in one C++ call (csrc/triton_table.cpp) through the optimizer's
plan, which also advances the counts when one launch has every param, and copied to the device
in one transfer from pinned memory; the learning rate, when a Tensor, and the GradScaler's scale
are read by the kernel on the device.
"""
from __future__ import annotations

import importlib.util
import os
import types
from typing import Dict, List, Optional, Tuple

import torch

from .. import reference, reference_lowp
from .base import Backend, Batch, SkippedCounts, defers_found_inf
from .reference import check_batch
from .triton_tables import _bump_steps, _next_counts, _pair_table, _step_table

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
    itab = torch.tensor([buf[0].data_ptr(), buf[1].data_ptr(), buf[2].data_ptr(), buf[3].data_ptr(),
                         buf[2].data_ptr(), numel], dtype=torch.int64)
    # one tensor's packed table (triton_kernels/adam.py): its row, corrections, hyperparameters
    tab = torch.cat([itab.view(torch.float64),
                     torch.tensor([0.1, 0.03, 1e-4, 0.9, 0.999, 1e-8, 0.0], dtype=torch.float64)])
    tab = tab.to(device)
    for block, warps in CONFIGS:
        grid = -(-numel // block)
        starts = torch.tensor([0, grid], dtype=torch.int64, device=device)

        def launch():
            kernels.adam_kernel[(grid,)](
                tab, starts, tab, tab, 1, N_SEARCH=1, P_DTYPE=tl.float32,
                MATH=tl.float32, BLOCK=block, AMSGRAD=False, MAXIMIZE=False, COUPLED=False,
                SCALED=False, LR_TENSOR=False, part=tab, cbase=tab, STATS=False,
                num_warps=warps, enable_fp_fusion=False)

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
    """The jit functions the backend launches (triton_kernels/adam.py and stats.py), and tl."""
    global _kernels
    if _kernels is None:
        from onepass.triton_kernels import adam, stats  # imports triton

        _kernels = types.SimpleNamespace(
            adam_kernel=adam.adam_kernel, adam_int8_kernel=adam.adam_int8_kernel,
            stats_group_kernel=stats.stats_group_kernel, stats_sum_kernel=stats.stats_sum_kernel,
            tl=adam.tl)
    return _kernels


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64,
            torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


# int8 state: blocks (reference.INT8_BLOCK elements of one dim-0 row) per program, and warps.
INT8_BLOCKS = 4
INT8_WARPS = 4
# stats_sum_kernel: group sums loaded per round of its sequential loop (loads issued ahead of adds).
STATS_UNROLL = 16
# adam_kernel with statistics: chunks per program (reference.STATS_CHUNK each), walked as
# (chunks, reference.STATS_LANES) tiles, and warps. 32 chunks make 512-element tiles, 4 per thread
# of 4 warps; not measured (no GPU run of this kernel yet). The interpreter (CPU tests) takes 4:
# a tile there is numpy arrays, and a wide one is mostly masked out on small test tensors.
STATS_CHUNKS = 32
STATS_CHUNKS_INTERPRETED = 4
STATS_WARPS = 4
# stats_group_kernel: warps per program (a [STATS_GROUP, 2] float64 tile).
STATS_GROUP_WARPS = 8


def stats_group_tables(chunk_start: List[int], device) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The tables of the statistics' sums, given the params' chunk ranges (param i: chunks
    [chunk_start[i], chunk_start[i + 1])): (gtab [n_groups, 2] the chunk range of each group of
    reference.STATS_GROUP consecutive chunks of a param, gctab [n_params, 2] each param's range
    of groups (empty param: none), n_groups), the tables on ``device``."""
    size = reference.STATS_GROUP
    gtab, gctab = [], []
    for i in range(len(chunk_start) - 1):
        c0, c1 = chunk_start[i], chunk_start[i + 1]
        first = len(gtab)
        gtab += [[c, min(c + size, c1)] for c in range(c0, c1, size)]
        gctab.append([first, len(gtab)])
    n_groups = len(gtab)
    both = torch.tensor([x for row in gtab + gctab for x in row], dtype=torch.int64).to(device)
    return both[: 2 * n_groups].view(-1, 2), both[2 * n_groups:].view(-1, 2), n_groups


def sum_stats(partials: torch.Tensor, gtab: torch.Tensor, gctab: torch.Tensor, n_groups: int,
              gsums: torch.Tensor, out: torch.Tensor,
              found_inf: Optional[torch.Tensor] = None) -> None:
    """out [n_params, 2] = each param's sums of its chunk partials (partials[2c], [2c + 1]) as
    reference.update_statistics adds them: per group by the tree (stats_group_kernel, into
    gsums, 2 * n_groups float64), then the group sums in order (stats_sum_kernel). out is left
    as it is when found_inf (a device tensor) is non-zero."""
    kernels = _load()
    size = reference.STATS_GROUP
    if n_groups:
        kernels.stats_group_kernel[(n_groups,)](
            partials, gtab, gsums, GROUP=size, GROUP_LOG2=size.bit_length() - 1,
            num_warps=STATS_GROUP_WARPS, enable_fp_fusion=False)
    kernels.stats_sum_kernel[(gctab.shape[0],)](
        gsums, gctab, out, U=STATS_UNROLL, found_inf=found_inf if found_inf is not None else gsums,
        SKIP=found_inf is not None, num_warps=1, enable_fp_fusion=False)


class _Plan:
    """What a launch needs that does not change while the batch's state lists stay the same:
    per param dtype, the indices of the non-empty params, the static table columns (moment,
    absmax and compensation addresses, numels, int8 row lengths), the block starts (already on
    the device), and the rows whose state is not contiguous (run on copies every step)."""

    def __init__(self, batch: Batch):
        self.block, self.warps = config_for(batch.device)
        self.int8 = batch.state_format == "int8"
        self.sr = batch.param_rounding == "stochastic"
        self.kahan = batch.param_rounding == "kahan"
        self.wide = batch.state_format != "fp32" or batch.param_rounding != "nearest"
        # With statistics, an adam_kernel program covers whole chunks (powers of two: a multiple),
        # STATS_CHUNKS of them: it walks them row by row, an (STATS_CHUNKS, STATS_LANES) tile a
        # step, so the chunk count sets the tile size.
        self.stats_chunks = STATS_CHUNKS if batch.device.type == "cuda" else STATS_CHUNKS_INTERPRETED
        self.stats_block = reference.STATS_CHUNK * self.stats_chunks
        unit = INT8_BLOCKS if self.int8 else self.block
        self.groups = []
        self.device = batch.device
        self.n_params = len(batch.params)
        by_dtype: Dict[torch.dtype, List[int]] = {}
        chunks = [0] * len(batch.params)  # statistics chunks per param (0 for empty ones)
        for i, p in enumerate(batch.params):
            if p.numel():
                by_dtype.setdefault(p.dtype, []).append(i)
                if self.int8:  # the int8 blocks are the chunks
                    rows_, per_row = reference.absmax_shape(p.shape)
                    chunks[i] = rows_ * per_row
                else:
                    chunks[i] = -(-p.numel() // reference.STATS_CHUNK)
        cstart = [0]
        for c in chunks:
            cstart.append(cstart[-1] + c)
        self.chunk_start = cstart  # param i's partials: chunks [cstart[i], cstart[i + 1])
        self.n_chunks = cstart[-1]
        self._stats = None  # (sum tables, partials, {group index: (cbase, starts, grid)}), made on first use
        self.launches: Dict[tuple, tuple] = {}  # TritonBackend._launch_args by (group, flags)
        self.numels: List[List[int]] = []  # per group: the numel of each param
        self.n_rows = sum(len(idx) for idx in by_dtype.values())  # params in a launch
        device = batch.device
        for dtype, idx in by_dtype.items():
            rows, starts, odd_state = [], [0], []
            for r, i in enumerate(idx):
                m, v = batch.exp_avgs[i], batch.exp_avg_sqs[i]
                vm = batch.max_exp_avg_sqs[i] if batch.amsgrad else m
                row = [0, 0, m.data_ptr(), v.data_ptr(), vm.data_ptr(), m.numel()]
                states = [m, v, vm]
                units = m.numel()
                if self.wide:
                    comp = batch.kahan_comps[i] if self.kahan else m
                    states.append(comp)
                    length = reference.int8_rows(m.shape)[1]
                    row += [comp.data_ptr(), 0, 0, 0, 0, length]
                    if self.int8:
                        am, av = batch.exp_avg_absmaxs[i], batch.exp_avg_sq_absmaxs[i]
                        row[7], row[8] = am.data_ptr(), av.data_ptr()
                        rows_, per_row = reference.absmax_shape(m.shape)
                        units = rows_ * per_row  # blocks
                rows.append(row)
                starts.append(starts[-1] + -(-units // unit))
                if not all(x.is_contiguous() for x in states):
                    odd_state.append(r)
            static = torch.tensor(rows, dtype=torch.int64)
            self.numels.append([batch.params[i].numel() for i in idx])
            self.groups.append((dtype, torch.tensor(idx, dtype=torch.int64), idx, static,
                                torch.tensor(starts, dtype=torch.int64).to(device), starts[-1],
                                odd_state))

    def stats_tables(self, g: int):
        """For the statistics: (the sums' tables (gtab, gctab, n_groups, the group sums buffer:
        stats_group_tables), the partials buffer, group g's (chunk bases, block starts, grid) with
        whole chunks per program), on the device. Made on the first step with statistics and kept
        (they depend on the shapes only)."""
        if self._stats is None:
            cs = self.chunk_start
            gtab, gctab, n_groups = stats_group_tables(cs, self.device)
            gsums = torch.zeros(max(1, 2 * n_groups), dtype=torch.float64, device=self.device)
            partials = torch.zeros(max(1, 2 * self.n_chunks), dtype=torch.float64, device=self.device)
            per_group = {}
            for k, group in enumerate(self.groups):
                idx = group[2]
                cbase = torch.tensor([cs[i] for i in idx], dtype=torch.int64).to(self.device)
                if self.int8 or self.stats_block == self.block:
                    starts, grid = group[4], group[5]
                else:
                    st = [0]
                    for n in self.numels[k]:
                        st.append(st[-1] + -(-n // self.stats_block))
                    starts, grid = torch.tensor(st, dtype=torch.int64).to(self.device), st[-1]
                per_group[k] = (cbase, starts, grid)
            self._stats = ((gtab, gctab, n_groups, gsums), partials, per_group)
        sums, partials, per_group = self._stats
        return sums, partials, per_group.get(g)


def _walk_view(p: torch.Tensor, int8: bool):
    """The permutation of dims that walks a dense non-contiguous param in storage order (the
    element order of reference.element_index), or None: row-major (contiguous params, params with
    gaps, int8 state, whose blocks are always row-major)."""
    if int8 or p.is_contiguous() or not reference_lowp._dense(p):
        return None
    perm = sorted(range(p.dim()), key=lambda d: -p.stride(d))
    return perm if p.permute(perm).is_contiguous() else None


def _check_stats(batch: Batch) -> None:
    out = batch.stats
    if out is not None and not (out.dtype == torch.float64 and out.is_contiguous()
                                and out.device == batch.device
                                and tuple(out.shape) == (len(batch.params), 2)):
        raise ValueError(f"onepass: stats must be a contiguous float64 [{len(batch.params)}, 2] "
                         f"tensor on {batch.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


class TritonBackend(Backend):
    name = "triton"
    state_formats = ("fp32", "bf16", "int8")
    param_roundings = ("nearest", "stochastic", "kahan")
    statistics = True  # every state format and param rounding above (kernels' STATS flag)
    checks_before_writing = True  # step() checks its batch before the first write
    takes_plan = True  # the (param, grad) table and the counts' increment through Batch.plan

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
        if batch.plan is not None and "triton" in batch.scratch:
            _pair_table(batch)  # the grads, in C++
        else:
            check_batch(batch, check_state="triton" not in batch.scratch)
        _check_stats(batch)

    def step(self, batch: Batch) -> None:
        # AMP overflow: nothing changes, not even the step count. Inside an optimizer the kernels
        # read found_inf on the device and write nothing when it is set; the host counts, which
        # the tables need now, advance and go back at the optimizer's next settle (SkippedCounts)
        # if the step was skipped: no host sync. Outside one (no Batch.deferred), or with
        # found_inf on the host, it is read here.
        found = batch.found_inf
        defer = defers_found_inf(batch)
        if found is not None and not defer and bool(found.item() != 0):
            return
        plan = batch.scratch.get("triton")
        if plan is None:
            check_batch(batch)  # new state lists: check the moments once
            plan = _Plan(batch)
        _check_stats(batch)
        # Every launch's table first: they check this step's grads and counts before the first
        # write (the counts of empty params, in no launch, apart); the counts' increment is the
        # first write, made by the table itself when one launch has every param.
        if len(plan.groups) == 1 and plan.n_rows == plan.n_params:
            tables = [_step_table(batch, plan, plan.groups[0], bump=True)]
        else:
            if plan.n_rows != plan.n_params:
                _next_counts(batch)
            tables = [_step_table(batch, plan, group) for group in plan.groups]
            _bump_steps(batch)
        batch.scratch["triton"] = plan
        fi = found if defer else None
        for k, (group, table) in enumerate(zip(plan.groups, tables)):
            self._launch(batch, plan, k, group, table, fi)
        if batch.stats is not None:
            self._sum_stats(batch, plan, fi)
        if defer:
            batch.deferred.append(SkippedCounts(fi, batch.steps))

    @staticmethod
    def _sum_stats(batch: Batch, plan: _Plan, found_inf: Optional[torch.Tensor]) -> None:
        """Each param's float64 sums of its chunk partials (per group by the tree, then the
        groups in order) into batch.stats (empty params: no chunks, so (0, 0)); nothing when
        found_inf (on the device) is set."""
        if plan.n_params == 0:
            return
        (gtab, gctab, n_groups, gsums), partials, _ = plan.stats_tables(0)
        sum_stats(partials, gtab, gctab, n_groups, gsums, batch.stats, found_inf)

    def _launch(self, batch: Batch, plan: _Plan, k: int, group, table,
                found_inf: Optional[torch.Tensor]) -> None:
        dtype, idx_t, idx, static, starts, grid, odd_state = group
        packed, odd = table
        device = batch.device
        n = len(idx)
        keep = []         # temporaries that must live until the launch is queued
        write_back = []   # (tensor, contiguous working copy)
        if odd_state:
            odd = sorted(set(odd) | set(odd_state))
        if odd:  # rare: a non-contiguous param, grad or state tensor
            w = static.shape[1]
            itab = packed[: w * n].view(torch.int64).view(n, w)
            for row in odd:
                keep += self._contiguous_copies(batch, plan, idx[row], itab, row, write_back)
        if device.type == "cuda":
            packed = packed.to(device, non_blocking=True)  # (pinned: no wait for the last step)
        lr = batch.lr
        lr_tensor = isinstance(lr, torch.Tensor)
        # (packed stands for any pointer the kernel does not read)
        lr_arg = lr.to(device) if lr_tensor else packed
        gs_arg = batch.grad_scale.to(device) if batch.grad_scale is not None else packed
        flags = (k, batch.stats is not None, lr_tensor, batch.grad_scale is not None,
                 found_inf is not None,
                 bool(batch.maximize), bool(batch.decoupled), bool(batch.amsgrad),
                 batch.qtables)  # (int8: the maps, FMAP; tensors hash by identity)
        launch = plan.launches.get(flags)
        if launch is None:
            launch = plan.launches[flags] = self._launch_args(batch, plan, k, group,
                                                               found_inf is not None)
        name, grid, starts, part, cbase, kwargs = launch
        kernel = getattr(_load(), name)
        if part is None:  # no statistics: the kernel reads neither
            part = cbase = packed
        fi = found_inf if found_inf is not None else packed  # (read only with SKIP)
        if plan.int8:
            qtab = batch.qtables.to(device=device, dtype=torch.float32).contiguous()
            kernel[(grid,)](packed, starts, lr_arg, gs_arg, qtab, n, part=part, cbase=cbase,
                            found_inf=fi, **kwargs)
        else:
            kernel[(grid,)](packed, starts, lr_arg, gs_arg, n, part=part, cbase=cbase,
                            found_inf=fi, **kwargs)
        for t, tc in write_back:
            t.copy_(tc)
        del keep

    @staticmethod
    def _launch_args(batch: Batch, plan: _Plan, k: int, group, skip: bool):
        """What a launch of group k passes besides this step's tables (the kernel's name, grid,
        block starts, statistics buffers or None, and its compile-time arguments), for the
        batch's flags: made once per plan and flags (~10 us of Python a launch otherwise)."""
        dtype, idx_t, idx, static, starts, grid = group[:6]
        kwargs = dict(N_SEARCH=max(1, (len(idx) - 1).bit_length()), P_DTYPE=_tl_dtype(dtype),
                      MAXIMIZE=bool(batch.maximize), COUPLED=not batch.decoupled,
                      SCALED=batch.grad_scale is not None,
                      LR_TENSOR=isinstance(batch.lr, torch.Tensor), ITAB_W=static.shape[1],
                      SR=plan.sr, KAHAN=plan.kahan, SKIP=skip, enable_fp_fusion=False)
        block, warps = plan.block, plan.warps
        part = cbase = None
        if batch.stats is not None:  # chunk partials too: whole chunks a program
            _, part, (cbase, starts, grid) = plan.stats_tables(k)
            if not plan.int8:
                block, warps = plan.stats_block, STATS_WARPS
        kwargs.update(STATS=batch.stats is not None)
        if plan.int8:
            from .. import quant

            kwargs.update(QB=INT8_BLOCKS, QBLOCK=reference.INT8_BLOCK, CODE_M=quant.CODE_M,
                          MID_M=quant.MID_M, CODE_V=quant.CODE_V, MID_V=quant.MID_V,
                          FMAP=quant.is_float3(batch.qtables),
                          QBLOCK_LOG2=reference.INT8_BLOCK.bit_length() - 1, num_warps=INT8_WARPS)
            return "adam_int8_kernel", grid, starts, part, cbase, kwargs
        kwargs.update(MATH=_tl_dtype(reference.math_dtype(dtype)), BLOCK=block,
                      AMSGRAD=bool(batch.amsgrad), STATE_BF16=batch.state_format == "bf16",
                      SCHUNK=reference.STATS_CHUNK, SLANES=reference.STATS_LANES,
                      SLANES_LOG2=reference.STATS_LANES.bit_length() - 1, num_warps=warps)
        return "adam_kernel", grid, starts, part, cbase, kwargs

    @staticmethod
    def _contiguous_copies(batch: Batch, plan: _Plan, i: int, table: torch.Tensor, row: int,
                           write_back: list) -> list:
        """Points ``row`` of the table at contiguous tensors walked in the order the kernel
        must use (_walk_view): views where the layout allows, else copies (written back after
        the launch). Returns the working tensors, which must live until the launch is queued."""
        perm = _walk_view(batch.params[i], plan.int8)

        def walk(x: torch.Tensor) -> torch.Tensor:
            return x.permute(perm) if perm is not None else x

        cols = [(0, batch.params[i], True), (1, batch.grads[i], False),
                (2, batch.exp_avgs[i], True), (3, batch.exp_avg_sqs[i], True)]
        if batch.amsgrad:
            cols.append((4, batch.max_exp_avg_sqs[i], True))
        if plan.kahan:
            cols.append((6, batch.kahan_comps[i], True))
        out = []
        for col, x, written in cols:
            xw = walk(x)
            xc = xw.contiguous()
            if written and xc is not xw:
                write_back.append((xw, xc))
            table[row, col] = xc.data_ptr()
            out.append(xc)
        if not batch.amsgrad:
            table[row, 4] = table[row, 2]
        return out
