"""The optimizer's per-group cache and its C++ plan (csrc/group_plan.h, onepass._C.GroupPlan):
what a step reuses while a group's params, state and settings stay the same, so that it does
no per-param Python work."""
from __future__ import annotations

from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor

from . import _ops, quant


class GroupCache:
    """What a group's steps reuse while its state is unchanged (``epoch``, ``state``) and its
    settings (``mode``) are the same: the params that had grads (``ids``), their state lists by
    part (``parts``: {(state format, rounding): (params, positions, lists, scratch)}), whether
    any is a DTensor or complex, the C++ plan of the parts (None where none applies), and the
    last step's batches."""

    __slots__ = ("ids", "epoch", "state", "mode", "parts", "dtensors", "complexes", "plan",
                 "batches", "batch_key")

    def __init__(self, ids, epoch, state, mode, parts, dtensors, complexes):
        self.ids, self.epoch, self.state, self.mode = ids, epoch, state, mode
        self.parts, self.dtensors, self.complexes = parts, dtensors, complexes
        self.plan = None
        #: The last step's [(backend, batch)] and the settings key they were made with: reused
        #: while the plan applies (not with statistics, whose tensor is new every step).
        self.batches = None
        self.batch_key = None


def make_plan(all_params: List[Tensor], parts, cache: GroupCache, device: torch.device):
    """The group's onepass._C.GroupPlan, or None where none applies: without the extension, and
    for DTensor or complex params (the kernels take views of them, made every step)."""
    if cache.dtensors or cache.complexes or not _ops.HAS_EXT or type(all_params) is not list:
        return None
    qt = quant.tables(device) if any(k[0] == "int8" for k in parts) else None
    return _ops._C.GroupPlan(all_params, [
        (idx, ps, lists[0], lists[1], lists[2], lists[3], lists[4], lists[5], lists[6],
         qt if pfmt == "int8" else None, pfmt, prnd, cache.mode[0])
        for (pfmt, prnd), (ps, idx, lists, _) in parts.items()])


class PlanGrads(Sequence):
    """A batch's grads as the plan read them, made a Python list only when a backend asks (the
    kernels behind the plan take them from C++)."""

    __slots__ = ("_plan", "_part", "_n", "_list")

    def __init__(self, plan, part: int, n: int):
        self._plan, self._part, self._n, self._list = plan, part, n, None

    def _get(self) -> List[Tensor]:
        if self._list is None:
            self._list = self._plan.grads(self._part)
        return self._list

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._get()[i]

    def __iter__(self):
        return iter(self._get())
