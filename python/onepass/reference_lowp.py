"""The storage rules of the reference (reference.py, module docstring "Storage"; ARCHITECTURE.md
section 2): the math dtype a param's state is kept in, the counter-based random streams and bf16
stochastic rounding, the element order the streams are indexed by, and the int8 blocks with their
absmax. reference.py
states the update around them and re-exports every public name here, so ``reference.X`` is where each
rule is read; csrc/adam_math.h and triton_kernels/adam.py are their twins."""

from __future__ import annotations

import torch
from torch import Tensor


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float64 params compute (and keep state) in float64; every other dtype in float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


#: Optimizer-state formats: "fp32" (the math dtype: float32, float64 for float64 params), "bf16"
#: (moments rounded stochastically to bfloat16) and "int8" (blockwise 8-bit codes + absmax).
STATE_FORMATS = ("fp32", "bf16", "int8")
#: How a bf16 param is written back: to nearest even, stochastically, or with a bf16 Kahan
#: compensation buffer carrying what the rounding lost.
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
#: int8 state: elements per block (one float32 absmax each), blocks never crossing a dim-0 row.
INT8_BLOCK = 256
#: Random-stream numbers of the counter-based hash: the param, and the two bf16 moments together
#: (one draw of 32 bits an element feeds both moments' roundings: :func:`moment_bits`).
STREAM_PARAM, STREAM_MOMENTS = 0, 1

_M32 = 0xFFFFFFFF
# Multipliers of the 32-bit mixing function (a lowbias32-style xor-shift-multiply hash; constants
# below 2**31 so the products stay exact in int64 in the torch statement below).
_MIX1, _MIX2 = 0x21F0AAAD, 0x735A2D97
_GOLDEN = 0x9E3779B9   # spreads consecutive (step, stream) counters over the key space
_HI_MULT = 0x85EBCA6B  # folds bits 32.. of an element index into the key


def mix32(x):
    """The 32-bit mixing function on an int (Python) or an int64 tensor of values in [0, 2**32):
    x ^= x>>16; x *= 0x21F0AAAD; x ^= x>>15; x *= 0x735A2D97; x ^= x>>15 (all mod 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & _M32
    return x ^ (x >> 15)


def stream_key(seed: int, step: int, stream: int) -> int:
    """The 32-bit key of one random stream at one step (host side, once per tensor and step)."""
    return mix32((int(seed) + _GOLDEN * (4 * int(step) + int(stream))) & _M32)


def random_bits(key: int, index: Tensor) -> Tensor:
    """32 random bits per element: mix32(key ^ lo32(index) ^ (hi32(index) * 0x85EBCA6B mod 2**32))
    for int64 element indices; an int64 tensor of values in [0, 2**32)."""
    folded = (index & _M32) ^ (((index >> 32) * _HI_MULT) & _M32)
    return mix32(folded ^ key)


def moment_bits(bits: Tensor) -> tuple[Tensor, Tensor]:
    """The random bits of m's and of v's stochastic rounding from one draw of the moments' stream:
    m takes the low 16 bits, v the high 16. (round_bf16_stochastic reads 16 bits; a separate stream
    for v cost a second hash an element, 0.14 of the CPU's 0.86 ns a bf16-state element.)"""
    return bits, bits >> 16


def round_bf16_stochastic(x: Tensor, bits: Tensor) -> Tensor:
    """float32 -> bfloat16, rounding up in magnitude with probability (dropped bits) / 2**16: the
    low 16 random bits are added to the float32 bit pattern, then the low half is cut off.
    Non-finite values round to nearest (NaN stays NaN, inf stays inf)."""
    b = x.view(torch.int32).to(torch.int64) & _M32
    hi = (torch.add(b, bits & 0xFFFF) >> 16) & 0xFFFF
    sr = torch.sub(torch.bitwise_xor(hi, 0x8000), 0x8000).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), sr, x.to(torch.bfloat16))


def element_index(param: Tensor, contiguous_walk: bool = False) -> Tensor:
    """Each element's index in the order the kernels walk the param: storage order for a dense
    param (its state has the same strides), row-major order otherwise or when ``contiguous_walk``
    (int8 state, which is always row-major)."""
    n = param.numel()
    base = torch.arange(n, dtype=torch.int64, device=param.device)
    if not contiguous_walk and _dense(param) and not param.is_contiguous():
        return base.as_strided(param.shape, param.stride())
    return base.view(param.shape)


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of its dims is contiguous (as at::Tensor's
    is_non_overlapping_and_dense, which Python does not expose)."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def int8_rows(shape) -> tuple[int, int]:
    """(rows, row length) of the int8 block layout: dim 0 by the rest (a 0-/1-dim tensor is one row)."""
    n = 1
    for d in shape:
        n *= int(d)
    if len(shape) < 2:
        return 1, n
    rows = int(shape[0])
    return rows, (n // rows if rows else 0)


def absmax_shape(shape) -> tuple[int, int]:
    """The shape of an int8 moment's absmax tensor: (rows, blocks per row)."""
    rows, length = int8_rows(shape)
    return rows, -(-length // INT8_BLOCK)


def dequantize_blocks(q: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    """float32 values code[q] * absmax (one multiply) of a uint8 tensor laid out as int8_rows."""
    rows, length = int8_rows(q.shape)
    vals = code.to(q.device)[q.reshape(rows, length).long()]
    scale = absmax.repeat_interleave(INT8_BLOCK, dim=1)[:, :length]
    return torch.mul(vals, scale).view(q.shape)


def quantize_blocks(x: Tensor, mid: Tensor, keep_positive: bool = False) -> tuple[Tensor, Tensor]:
    """(codes uint8 of x's shape, absmax float32 [rows, blocks]) of float32 ``x``.

    ``keep_positive`` (the second moment v): a positive ``x * r`` never gets code 0 but at least
    code 1, the map's smallest positive value. A v that dequantized to 0 while its m kept a code
    would turn the next small or zero gradient into a step of lr * m / eps, thousands of times
    the usual one (the failure of blockwise 8-bit optimizers the main job's accuracy protocol
    shows); the smallest code bounds |m| / sqrt(v) near 1 instead.

    absmax = max |x| over the block (NaN if any element is NaN). Its scale r = 1 / absmax (one
    correctly rounded division per block; 0 when absmax is below the smallest normal float32, inf
    or NaN, so r is always finite) and x * r (one multiply per element: a kernel spends one
    division per block, not one per element) picks code q = number of midpoints < x * r, so ties go
    to the lower code and NaN to code 0. x * r may exceed 1 by an ulp; the count tops out at 255.
    A non-finite block dequantizes to non-finite values (absmax inf or NaN): never to
    plausible-looking numbers. A block whose absmax is below 2**-126 stores zeros' code (values
    that small are zero to an optimizer; 1 / absmax would overflow)."""
    rows, length = int8_rows(x.shape)
    x2 = x.reshape(rows, length)
    nb = -(-length // INT8_BLOCK)
    padded = torch.nn.functional.pad(x2, (0, nb * INT8_BLOCK - length))
    absmax = padded.view(rows, nb, INT8_BLOCK).abs().amax(dim=-1)
    usable = (absmax >= torch.finfo(torch.float32).tiny) & (absmax < float("inf"))
    inv = torch.where(usable, torch.div(1.0, absmax), torch.zeros((), dtype=x.dtype, device=x.device))
    scale = inv.repeat_interleave(INT8_BLOCK, dim=1)[:, :length]
    xn = torch.mul(x2, scale)
    q = torch.searchsorted(mid.to(x.device), xn.contiguous())
    q = torch.where(torch.isnan(xn), torch.zeros_like(q), q)
    if keep_positive:
        q = torch.where((q == 0) & (xn > 0), torch.ones_like(q), q)
    return q.to(torch.uint8).view(x.shape), absmax
