"""DTensor params (FSDP2): the kernels take plain tensors, so a step runs on the local shards, and
the state is kept as DTensors shaped like their params (what torch.distributed.checkpoint expects).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from . import reference

# Under FSDP2 (fully_shard) params and grads are DTensors sharded on dim 0. The kernels take plain
# tensors, so a step runs on the local shards: to_local() is the DTensor's own storage, so writing
# it is the update. State is kept as DTensors with the param's mesh and placements, as
# torch.optim.AdamW's is, because torch.distributed.checkpoint (get/set_optimizer_state_dict,
# dcp.save/load) expects state shaped like its param; an int8 moment's absmax [rows, blocks per
# row] is sharded on dim 0 alike, so its local shard is the absmax of the local rows. The math is
# elementwise and int8 blocks lie within dim-0 rows, so dim-0 sharding (or replication) gives the
# bits of an unsharded run; int8 state under any other sharding would not, and is refused.

def _dtensor_type():
    """torch's DTensor class once torch.distributed.tensor is imported (no DTensor can exist
    before), else None: looked up, not imported, so builds without torch.distributed work."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _local(t: Any) -> Any:
    """A DTensor's local shard (its own storage, also under autograd), anything else unchanged."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def _local_grad(p: Tensor, g: Tensor) -> Tensor:
    """The local shard of DTensor param ``p``'s grad, laid out as ``p`` is (FSDP2's grads are)."""
    if _is_dtensor(g) and (g.device_mesh != p.device_mesh or g.placements != p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return _local(g)


def _local_absmax(a: Tensor) -> Tensor:
    """An absmax's local shard as the kernels expect it: a shard with no rows is [0, 0] to them
    (no row, no block) but [0, blocks] as part of the global [rows, blocks]."""
    a = _local(a)
    return a[:, :0] if a.dim() == 2 and a.shape[0] == 0 else a


def _check_int8_placements(p: Tensor, fmt: str) -> None:
    if fmt != "int8":
        return
    from torch.distributed.tensor import Replicate, Shard
    for pl in p.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise ValueError(
                f"onepass: int8 state needs a param that is replicated or sharded on dim 0 (its "
                f"blocks lie within dim-0 rows), got placements {tuple(p.placements)}; use "
                f"state_dtype='fp32' or 'bf16' for it, or min_int8_numel to exclude it")


def _wrap_state(p: Tensor, k: str, t: Tensor) -> Tensor:
    """Local state tensor ``t`` (key ``k``) of DTensor param ``p`` as a DTensor with p's mesh and
    placements: shaped like p, or for an absmax [rows, blocks per row] of p's global shape."""
    if k.endswith("_absmax"):
        shape = tuple(reference.absmax_shape(p.shape))
        if t.shape[0] == 0:  # no local rows: [0, 0] from the local shape, [0, blocks] globally
            t = t.new_zeros((0, shape[1]))
        stride = (shape[1], 1)
    else:
        shape, stride = tuple(p.shape), tuple(p.stride())
    return _dtensor_type().from_local(t, p.device_mesh, p.placements, run_check=False,
                                      shape=torch.Size(shape), stride=stride)
