"""The fused statistics of the reference (reference.update_statistics is the rule every backend's
kernel must give bit for bit): each param's sum of w**2 and of (w - w_before)**2 in float64, by
chunk partials (chunk_partials), halving trees of groups of them and an in-order sum
(sequential_sum). reference.py re-exports every name here."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference_lowp import INT8_BLOCK, element_index, int8_rows, math_dtype


#: Elements per chunk of the statistics' partial sums (int8 state: its blocks are the chunks).
STATS_CHUNK = 2048
#: Lanes of an element-wise format's chunk: STATS_CHUNK // STATS_LANES = 128 rows of
#: STATS_LANES consecutive elements, added row after row (see chunk_partials). An int8 block is
#: summed by the tree alone.
STATS_LANES = 16
#: Chunk partials per second-level tree: a param's chunks are summed in groups of this many by the
#: same halving tree (float64), and only the groups' sums in order. A GPU then adds at most a few
#: hundred values one after another per param (2**30 elements: 256), not 2**19 chunks.
STATS_GROUP = 2048


def chunk_partials(x: Tensor, chunk: int, lanes: Optional[int] = None) -> Tensor:
    """The sum of each ``chunk`` consecutive elements of 1-D ``x`` (zero-padded). The chunk is
    cut into rows of ``lanes`` consecutive elements; the rows are added lane by lane in order
    (row 0 + row 1, then + row 2, ...), then the lanes by a halving tree ``a[:h] + a[h:]`` until
    one element is left. ``lanes`` = ``chunk`` (the default): the tree alone.

    Why rows first: a kernel walks the chunk in memory order, so it adds each row's squares into
    its lane accumulators (16: vector registers on a CPU, threads on a GPU) inside the update loop
    while the loads are in flight, and only the short tree over the lanes runs after it. A tree
    over the whole chunk needs its squares stored and summed in a pass of its own: on a 2-core
    Zen 3 that cost +21% of a gpt2 step (csrc/cpu/stats.h has the figures). A fixed order
    either way, so SIMD lanes, GPU threads and this statement all add the same pairs."""
    lanes = chunk if lanes is None else lanes
    n = x.numel()
    nc = -(-n // chunk)
    a = torch.nn.functional.pad(x.reshape(-1), (0, nc * chunk - n)).view(nc, chunk // lanes, lanes)
    acc = a[:, 0]
    for r in range(1, chunk // lanes):
        acc = torch.add(acc, a[:, r])
    h = lanes
    while h > 1:
        h //= 2
        acc = torch.add(acc[:, :h], acc[:, h:])
    return acc.reshape(nc)


def sequential_sum(partials: Tensor) -> float:
    """float64 sum of the partials in order, from 0.0 (the host loop of every backend)."""
    total = 0.0
    for v in partials.to(torch.float64).tolist():
        total += v  # a Python float add: one IEEE double add
    return total


def _walk(x: Tensor, like: Tensor, int8: bool, dt: torch.dtype) -> Tensor:
    """``x``'s elements as the kernels walk ``like`` (1-D, math dtype); for int8 state each
    dim-0 row is padded with zeros to whole blocks, so chunk k is block k."""
    x = x.to(dt)
    if int8:
        rows, length = int8_rows(x.shape)
        nb = -(-length // INT8_BLOCK)
        return torch.nn.functional.pad(x.reshape(rows, length), (0, nb * INT8_BLOCK - length)).reshape(-1)
    out = torch.empty(x.numel(), dtype=dt, device=x.device)
    out[element_index(like).reshape(-1)] = x.reshape(-1)
    return out


def update_statistics(old: Tensor, new: Tensor, int8: bool = False) -> tuple[float, float]:
    """(Σ w², Σ Δw²) of one step: ``w`` = the param as stored after the step, ``Δw = w − w_old``
    (the param as stored before), in the math dtype; each square one rounded multiply. Sums: per
    chunk (:data:`STATS_CHUNK` elements of the walk in rows of :data:`STATS_LANES`, or an int8
    block by the tree alone) by :func:`chunk_partials` in the math dtype; the chunk sums, widened to float64, per
    group of :data:`STATS_GROUP` by :func:`chunk_partials` again (the tree alone); then
    :func:`sequential_sum` over the groups. ‖w‖ and ‖Δw‖ are the square roots (taken by the
    optimizer, not the kernels)."""
    dt = math_dtype(new.dtype)
    chunk, lanes = (INT8_BLOCK, INT8_BLOCK) if int8 else (STATS_CHUNK, STATS_LANES)
    w = _walk(new, new, int8, dt)
    d = torch.sub(w, _walk(old, new, int8, dt))

    def total(sq: Tensor) -> float:
        parts = chunk_partials(sq, chunk, lanes).to(torch.float64)
        return sequential_sum(chunk_partials(parts, STATS_GROUP))

    return total(torch.mul(w, w)), total(torch.mul(d, d))
