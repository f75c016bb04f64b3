"""The triton backend's per-step host tables (backends/triton.py launches with them): each
launch's packed table of this step's addresses, bias corrections and keys -- in one C++ call
(csrc/triton_table.cpp) through the optimizer's plan, or from torch ops without the extension --
and the step counts' increment."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from .. import _ops, reference
from .base import Batch
from .reference import _bad_pair, check_count

if TYPE_CHECKING:
    from .triton import _Plan


def _bump_steps(batch: Batch) -> None:
    """step += 1 for every param: the C++ helper when built (~20 ns a tensor; through the
    optimizer's plan, without converting the list), else torch ops (~3.5 us a tensor on a 2-core
    machine)."""
    if batch.plan is not None:
        batch.plan[0].bump_steps(batch.plan[1])
    elif _ops.HAS_EXT:
        _ops._C.bump_steps(batch.steps)
    else:
        torch._foreach_add_(batch.steps, 1.0)


def _next_counts(batch: Batch) -> List[int]:
    """The distinct values of this step's counts (count + 1; nearly always one value)."""
    if batch.plan is not None:
        return batch.plan[0].next_counts(batch.plan[1])
    if _ops.HAS_EXT:
        return _ops._C.next_counts(batch.steps)
    return list(dict.fromkeys(_next_count(s, i) for i, s in enumerate(batch.steps)))


def _next_count(step: torch.Tensor, i: int) -> int:
    # count + 1 in the count's dtype (a float32 count stops at 2**24, as torch's and the C++'s)
    check_count(float(step.item()), i)
    return int((step + 1).item())


def _pair_rows(params, grads) -> torch.Tensor:
    """Checks the (param, grad) pairs and gives int64 [n, 3]: param address, grad address, flags
    (1: param contiguous, 2: grad contiguous). Raises before anything is written."""
    if _ops.HAS_EXT:
        return _ops._C.pair_table(params, grads)
    rows = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not (g.layout is torch.strided and g.dtype == p.dtype and g.shape == p.shape
                and g.device == p.device):
            _bad_pair(i, p, g)
        rows.append([p.data_ptr(), g.data_ptr(), int(p.is_contiguous()) | 2 * int(g.is_contiguous())])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def _pair_table(batch: Batch) -> torch.Tensor:
    """_pair_rows of a batch, through the optimizer's plan where there is one (the grads it read
    in C++)."""
    if batch.plan is not None:
        return batch.plan[0].pair_table(batch.plan[1])
    return _pair_rows(batch.params, batch.grads)


# The columns of the random streams' keys in the wide (low-precision) table (_Plan).
KEY_COL = 9


def _step_table(batch: Batch, plan: "_Plan", group, bump: bool = False):
    """(packed, odd) for one launch: the float64 buffer the kernels read (the static rows with
    this step's param and grad addresses, each row's bias corrections and keys for its count, then
    the launch-wide scalars), pinned on a GPU so the copy does not wait for the last step's
    kernel; and the rows whose param or grad is not contiguous. Checks this step's grads and
    counts first; then, when ``bump`` (a launch of every param), advances the counts: the
    step's first write. Made in C++ (csrc/triton_table.cpp, corrections included) where the
    extension is built, else from torch ops and _correction."""
    dtype, idx_t, idx, static = group[:4]
    lr = batch.lr
    hp = [0.0 if isinstance(lr, torch.Tensor) else float(lr), batch.beta1, batch.beta2, batch.eps,
          batch.weight_decay]
    rows = None if len(idx) == plan.n_params else idx_t  # (idx ascends: all of them is range(n))
    key_col = KEY_COL if plan.wide else -1
    pin = batch.device.type == "cuda"
    math_f64 = reference.math_dtype(dtype) == torch.float64
    seed = int(batch.seed) if plan.wide else 0
    if batch.plan is not None:
        return batch.plan[0].triton_table(batch.plan[1], static, rows, batch.beta1, batch.beta2,
                                          math_f64, seed, key_col, hp, pin, bump)
    if _ops.HAS_EXT:
        return _ops._C.triton_table(batch.params, batch.grads, batch.steps, static, rows,
                                    batch.beta1, batch.beta2, math_f64, seed, key_col, hp, pin,
                                    bump)
    math_dt = reference.math_dtype(dtype)
    corr = [_correction(t, batch.beta1, batch.beta2, math_dt, batch.seed if plan.wide else None)
            for t in _next_counts(batch)]
    table = _step_table_torch(batch, static, idx, corr, key_col, hp, pin)
    if bump:
        _bump_steps(batch)
    return table


def _step_table_torch(batch: Batch, static: torch.Tensor, idx: List[int], corr, key_col: int,
                      hp: List[float], pin: bool):
    """_step_table from torch ops (an install without the extension)."""
    pairs = _pair_rows([batch.params[i] for i in idx], [batch.grads[i] for i in idx])
    table = static.clone()
    table[:, 0:2] = pairs[:, 0:2]
    by_count = {c[0]: c for c in corr}
    mine = [by_count[_next_count(batch.steps[i], i)] for i in idx]
    ftab = torch.tensor([c[1:3] for c in mine], dtype=torch.float64)
    if key_col >= 0:
        table[:, key_col:key_col + 2] = torch.tensor([c[3:] for c in mine], dtype=torch.int64)
    odd = (pairs[:, 2] != 3).nonzero().flatten().tolist()
    packed = torch.cat([table.view(torch.float64).reshape(-1), ftab.reshape(-1),
                        torch.tensor(hp, dtype=torch.float64)])
    return (packed.pin_memory() if pin else packed), odd


@functools.lru_cache(maxsize=256)
def _correction(t: int, beta1: float, beta2: float, math_dt: torch.dtype,
                seed: Optional[int]) -> Tuple[int, float, float, int, int, int]:
    """Step t's (t, 1 - beta1**t, inv_bc2_sqrt rounded to the math dtype, the random streams'
    keys (0 without a seed: fp32 state, nearest rounding)): the kernel computes lr / bc1 itself.
    (Cached for the groups of one step: every step has a new t.) The torch-ops table's; the
    compiled one makes the same bits in C++ (csrc/triton_table.cpp: correction)."""
    bc1 = 1.0 - reference.pow_int(beta1, t)
    bc2 = reference.step_scalars(t, 1.0, beta1, beta2, 0.0, 0.0, True)
    # Only inv_bc2_sqrt is needed rounded (StepScalars.rounded would round all nine: ~12 us of
    # the ~40 us host path of a gpt2 step).
    keys = ((0, 0) if seed is None else
            tuple(reference.stream_key(seed, t, s) for s in
                  (reference.STREAM_PARAM, reference.STREAM_MOMENTS)))
    return (t, bc1, reference.round_scalar(bc2.inv_bc2_sqrt, math_dt)) + keys
