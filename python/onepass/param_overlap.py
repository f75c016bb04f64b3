"""Params of one group that share memory: refused before a step writes any of them.

The kernels update a batch's params in parallel (the cpu backend splits them across threads,
the GPU kernels across blocks), so two params that address the same bytes (the same Parameter
listed twice, or two Parameters made views of one storage by hand) would be written by two
threads at once: a result that differs from the reference's one-param-after-another order and
from run to run. torch.optim.AdamW steps such a param twice, in order; onepass refuses it and
names both (tie weights by sharing one Parameter: ``model.parameters()`` lists it once).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from .distributed import _local
from .param_names import where


def _span(t: torch.Tensor):
    """The byte range [start, end) t's elements lie in, or None (no elements or no storage)."""
    n = t.numel()
    if n == 0 or t.device.type == "meta" or t.layout != torch.strided:
        return None
    extent = n if t.is_contiguous() else 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def check_disjoint(group_index: int, group: Dict[str, Any], positions: List[int]) -> None:
    """Raises ValueError if two of the group's params at ``positions`` (those this step writes)
    share memory. A param's memory is the byte range from its first to its last element, so
    two params interleaved in one storage (x[:, 0] and x[:, 1]) count as sharing it too."""
    params = group["params"]
    spans = []
    for j in positions:
        p = params[j]
        s = _span(_local(p))
        if s is not None:
            spans.append((s[0], s[1], p.device, j))
    spans.sort(key=lambda s: (str(s[2]), s[0]))
    reach = None  # of the ranges so far on this device, the one that ends last
    for s in spans:
        if reach is not None and reach[2] == s[2] and s[0] < reach[1]:
            raise _overlap(group_index, group, reach[3], s[3])
        if reach is None or reach[2] != s[2] or s[1] > reach[1]:
            reach = s


def _overlap(group_index: int, group: Dict[str, Any], j: int, k: int) -> ValueError:
    j, k = min(j, k), max(j, k)
    if group["params"][j] is group["params"][k]:
        what = f"{where(group_index, group, j)} is listed again as param {k}"
    else:
        what = f"{where(group_index, group, j)} shares memory with {where(group_index, group, k)}"
    return ValueError(
        f"onepass: {what}; the "
        "kernels write a group's params in parallel, so a param must appear once and no two "
        "params may share memory (tie weights by sharing one Parameter)")
