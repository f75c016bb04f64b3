"""What a step checks when the current CUDA stream is being captured into a graph (torch.optim's
check, with its wording, and onepass's lr check), and whether CUDA exists at all (asked once)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .optimizer import AdamW

#: torch.cuda.is_available(), asked once (see _cuda_available): step() asks whether the current
#: stream is capturing only where CUDA exists, so a step on a machine without it pays one call.
_CUDA_AVAILABLE: Optional[bool] = None


def _cuda_available() -> bool:
    global _CUDA_AVAILABLE
    if _CUDA_AVAILABLE is None:
        _CUDA_AVAILABLE = bool(torch.cuda.is_available())
    return _CUDA_AVAILABLE


def _capture_health_check(optimizer: "AdamW") -> None:
    """torch.optim's check (Optimizer._accelerator_graph_capture_health_check, with its wording)
    for a step() being captured in a CUDA graph, plus onepass's lr check. A graph replays only
    device work: a capturable=False group's host step counts and a host-side lr would be frozen
    at their values at capture. Called only while the current stream is capturing."""
    if not all(group["capturable"] for group in optimizer.param_groups):
        raise RuntimeError(
            "Attempting CUDA graph capture of step() for an instance of "
            + optimizer.__class__.__name__
            + " but param_groups' capturable is False."
        )
    for i, group in enumerate(optimizer.param_groups):
        lr, params = group["lr"], group["params"]
        if isinstance(lr, Tensor) and params and lr.device != params[0].device:
            raise RuntimeError(
                f"onepass: attempting CUDA graph capture of step() with param group {i}'s lr a "
                f"Tensor on {lr.device} while its params are on {params[0].device}: the graph "
                "would keep the lr read at capture. Give the group a one-element lr Tensor on the "
                "params' device and update it in place (lr.fill_(new_lr))."
            )
