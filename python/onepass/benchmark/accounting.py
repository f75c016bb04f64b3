"""Byte accounting: the bytes a step must move and the bytes of each optimizer's state."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch


# ---------------------------------------------------------------------------------------------------
# Byte accounting
# ---------------------------------------------------------------------------------------------------


def bytes_per_param(param_bytes: int = 4, grad_bytes: int | None = None,
                    state_bytes_per_param: int = 8) -> int:
    """Bytes one AdamW step must move per parameter element.

    Read param, grad and state, write param and state: ``2*param + grad + 2*state``. With fp32 params,
    grads and state (exp_avg + exp_avg_sq = 8 bytes): 28."""
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    return 2 * param_bytes + grad_bytes + 2 * state_bytes_per_param


def state_tensors(value: Any) -> Iterable[torch.Tensor]:
    """The plain tensors that hold ``value``'s data: a tensor itself; a tensor subclass (torchao's
    OptimState8bit/4bit/Fp8, DTensor) through ``__tensor_flatten__``, recursively (codes, scales
    and quantization maps); lists, tuples and dicts element by element. Anything else holds none."""
    if isinstance(value, torch.Tensor):
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        if is_traceable_wrapper_subclass(value):
            names, _ = value.__tensor_flatten__()
            for name in names:
                yield from state_tensors(getattr(value, name))
        else:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from state_tensors(v)


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-element optimizer state: every tensor reachable from ``optimizer.state``
    (``state_tensors``: subclass state through its inner tensors, bitsandbytes' and onepass's absmax
    and bitsandbytes' quantization maps included) except 0-dim ones such as ``step``. Each buffer is
    counted once (by device, address and size), so a map shared by every param's state, as
    bitsandbytes' is, or one tensor under two keys, is not double counted."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for st in optimizer.state.values():
        for t in state_tensors(st):
            if t.dim() == 0:
                continue
            nbytes = t.numel() * t.element_size()
            key = (str(t.device), t.data_ptr(), nbytes)
            if nbytes == 0 or key in seen:
                continue
            seen.add(key)
            total += nbytes
    return total


def bytes_moved(params: Sequence[torch.Tensor], state_bytes: int | None = None) -> int:
    """Bytes one step must move for ``params`` given the optimizer's total state bytes.

    ``state_bytes=None`` assumes torch's convention (two state tensors in the param dtype)."""
    n = 0
    nominal_state = 0
    for p in params:
        g = p.grad if p.grad is not None else p
        n += p.numel() * (2 * p.element_size() + g.element_size())
        nominal_state += 2 * p.numel() * p.element_size()
    return n + 2 * (nominal_state if state_bytes is None else state_bytes)
