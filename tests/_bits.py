"""Bit-exact tensor comparison under the NaN rule of ARCHITECTURE.md section 2.

Backends promise the reference's bits except inside a NaN: a GPU returns the canonical NaN from any
float operation with a NaN input while x86 keeps the input's payload, so NaN positions must match
but a NaN's payload and sign are unspecified. Every other element of a floating tensor is compared
by its bit pattern (so -0.0 and 0.0 differ, which ``torch.equal`` would not see); integer and bool
tensors are compared with ``torch.equal``.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["first_difference", "same_bits", "assert_same_bits"]

_UINT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_UINT_OF_SIZE[t.element_size()])


def _isnan(t: torch.Tensor) -> torch.Tensor:
    # float8 types have no isnan kernel everywhere; widening keeps NaN a NaN
    return (t.float() if t.element_size() == 1 else t).isnan()


def _show(t: torch.Tensor, bits: torch.Tensor, k: int) -> str:
    if not t.is_floating_point():
        return repr(t.reshape(-1)[k].item())
    width = 2 * t.element_size()
    raw = int(bits.reshape(-1)[k].item()) & ((1 << (8 * t.element_size())) - 1)
    return f"{t.reshape(-1)[k].item()!r} (0x{raw:0{width}x})"


def first_difference(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """None when ``a`` and ``b`` hold the same bits under the NaN rule, else what differs first
    (dtype, shape, or the first differing element with both values and bit patterns)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return f"not two tensors: {type(a).__name__} and {type(b).__name__}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        na, nb = _isnan(a), _isnan(b)
        ba, bb = _as_bits(a), _as_bits(b)
        differ = (na != nb) | (~na & ~nb & (ba != bb))
    else:
        if torch.equal(a, b):
            return None
        ba, bb = a, b
        differ = a != b
    if not bool(differ.any()):
        return None
    flat = differ.reshape(-1).nonzero()
    k = int(flat[0])
    index = tuple(int(i) for i in differ.nonzero()[0]) if differ.dim() else ()
    return (f"{len(flat)} of {differ.numel()} elements differ; first at index {index}: "
            f"{_show(a, ba, k)} vs {_show(b, bb, k)}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and shape, NaNs at the same positions (any payload or sign), every other
    element the same bit pattern (floating dtypes) or equal (integer and bool dtypes)."""
    return first_difference(a, b) is None


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "tensor") -> None:
    """``same_bits(a, b)``, or an AssertionError that names ``what`` and the first difference."""
    why = first_difference(a, b)
    if why is not None:
        raise AssertionError(f"{what}: {why}")
