"""The arithmetic of onepass, stated once in plain PyTorch.

Every backend (cpu, cuda, triton) must produce exactly these bits (``torch.equal``) for the same
inputs. The C++ twin of this file is ``csrc/adam_math.h``; the two are kept in step by the tests.

Per-step scalars (host, float64, IEEE ops only, then rounded once to the math dtype)::

    t         = step count after the increment (an integer)
    bc1       = 1 - beta1**t            (beta**t by binary exponentiation: multiplications only)
    bc2       = 1 - beta2**t
    step_size = lr / bc1
    inv_bc2_sqrt = 1 / sqrt(bc2)   (a multiplier: a division per element costs ~40% of a
                                   CPU step, measured on AVX2; one per step costs nothing)
    decay     = 1 - lr * weight_decay   (decoupled mode; 1 in coupled mode)
    beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay

Decay modes (:func:`effective_weight_decay`, on the host before the scalars above): "decoupled"
(AdamW: shrink by lr * weight_decay), "lr_independent" (shrink by weight_decay * lr / lr_max:
weight_decay / lr_max in float64, rounded once, takes weight_decay's place, so a schedule that
lowers lr lowers the shrink with it while changing the peak lr leaves it alone), "coupled" (Adam +
L2: weight_decay * p joins the gradient, decay = 1).

Element math, in the math dtype (float32; float64 for float64 params), one correctly rounded
operation at a time, in exactly this order::

    g  = grad                     (converted to the math dtype)
    g  = g / grad_scale           (only when a GradScaler hands over grad_scale)
    g  = -g                       (maximize)
    g  = g + weight_decay * p     (coupled mode: Adam + L2)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * (g * g)
    vh = max(v_max, v); v_max = vh          (amsgrad; else vh = v)
    p  = p * decay - step_size * (m / (sqrt(vh) * inv_bc2_sqrt + eps))

``p`` is read from the param (bf16/fp16 widened exactly) and written back rounded to nearest even.
State (m, v, v_max) is float32 for float32/bf16/fp16 params and float64 for float64 params.

Storage (low precision; each rule is one function below, shared by every backend's statement):

* ``state_format="bf16"``: m and v are stored as bfloat16, widened exactly on load and rounded
  **stochastically** on store (:func:`round_bf16_stochastic`: nearest rounding would freeze v,
  since (1 - beta2) * v = 0.001 v is below half a bf16 ulp of v).
* ``state_format="int8"``: m and v are stored as one byte per element, the index of a code of a
  256-value map (onepass.quant: signed for m, unsigned for v), and one float32 absmax per block of
  ``INT8_BLOCK`` = 256 elements of a dim-0 row. Load: ``code[q] * absmax``. Store: the updated
  block's absmax, then the nearest code of ``x * (1 / absmax)`` (:func:`quantize_blocks`: one
  division per block, one multiply per element), except that a positive v never gets v's zero
  code (``keep_positive``: v dequantizing to 0 under a nonzero m would make the step lr * m / eps).
* bf16 params: ``param_rounding="stochastic"`` rounds the new param stochastically;
  ``"kahan"`` keeps a bf16 compensation c: the param's value is ``p + c`` (one float32 add) and,
  after the update, ``p = nearest(p_new)``, ``c = nearest(p_new - p)``.
* Random bits come from a counter-based hash of (seed, step, stream, element index)
  (:func:`stream_key`, :func:`random_bits`): reproducible, and the same on every backend.

When ``found_inf`` (from ``torch.amp.GradScaler``) is non-zero nothing changes: no param, no
moment and no step count.

Rules that make the bits reproducible (ARCHITECTURE.md section 2): single torch ops (``mul``,
``add``, ``sub``, ``div``, ``maximum``), never ``lerp``/``addcmul``/``addcdiv`` or ``alpha=``
(they may fuse into an FMA); every scalar is a 0-dim tensor of the math dtype; and the square
root is computed by :func:`sqrt_rn` because torch's CPU ``sqrt`` is not correctly rounded
(about 15% of random float32 inputs and 1% of float64 inputs are 1 ulp off on torch 2.13).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "StepScalars",
    "step_scalars",
    "pow_int",
    "sqrt_rn",
    "math_dtype",
    "PARAM_DTYPES",
    "adam_step_",
    "adam_step_batch_",
]

#: The param dtypes onepass updates (state is float32 for the 16-bit ones, float64 for float64).
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Veltkamp's splitting constant for float64: 2**27 + 1 splits a 53-bit significand into two
# 26-bit halves whose products are exact.
_SPLIT = 134217729.0


def pow_int(base: float, n: int) -> float:
    """base**n by binary exponentiation in float64, multiplications only.

    ``math.pow`` and C's ``pow`` are not guaranteed to be correctly rounded and may differ between
    libm versions and CUDA; a fixed sequence of IEEE multiplications gives the same bits in Python,
    C++ host code and CUDA device code (``csrc/adam_math.h``: ``pow_int``).
    """
    result = 1.0
    b = float(base)
    n = int(n)
    while n > 0:
        if n & 1:
            result = result * b
        b = b * b
        n >>= 1
    return result


def round_scalar(x: float, dtype: torch.dtype) -> float:
    """A Python float rounded once (to nearest even) to ``dtype``, returned as a Python float."""
    if dtype == torch.float64:
        return float(x)
    if dtype == torch.float32:
        # struct's "f" format is a C (float) cast: round to nearest even, like torch's .to().
        try:
            return struct.unpack("f", struct.pack("f", x))[0]
        except OverflowError:  # |x| rounds past float32's range: inf, as torch gives
            pass
    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


@dataclass(frozen=True)
class StepScalars:
    """The per-step scalars, as float64 Python floats before rounding to the math dtype."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float
    decay: float
    step_size: float
    inv_bc2_sqrt: float

    def rounded(self, dtype: torch.dtype) -> "StepScalars":
        """Each scalar rounded once (to nearest even) to ``dtype``, still as Python floats."""
        return StepScalars(*(round_scalar(x, dtype) for x in self.astuple()))

    def astuple(self) -> tuple:
        return (
            self.beta1,
            self.one_minus_beta1,
            self.beta2,
            self.one_minus_beta2,
            self.eps,
            self.weight_decay,
            self.decay,
            self.step_size,
            self.inv_bc2_sqrt,
        )


DECAY_MODES = ("decoupled", "lr_independent", "coupled")


def effective_weight_decay(weight_decay: float, decay_mode: str, lr_max: Optional[float] = None) -> float:
    """The weight_decay the scalars below take for ``decay_mode``: weight_decay itself, or
    weight_decay / lr_max (float64, one rounding) for "lr_independent"."""
    if decay_mode not in DECAY_MODES:
        raise ValueError(f"onepass: decay_mode must be one of {DECAY_MODES}, got {decay_mode!r}")
    weight_decay = float(weight_decay)
    if decay_mode != "lr_independent":
        return weight_decay
    if lr_max is None or not float(lr_max) > 0.0 or math.isinf(float(lr_max)):
        raise ValueError(f"onepass: decay_mode='lr_independent' needs a finite lr_max > 0, got {lr_max!r}")
    return weight_decay / float(lr_max)


def step_scalars(
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> StepScalars:
    """The per-step scalars for step count ``step`` (already incremented, so >= 1).

    Float64 IEEE operations only, in the order of ``csrc/adam_math.h: make_step_scalars``.
    """
    t = int(step)
    lr = float(lr)
    beta1 = float(beta1)
    beta2 = float(beta2)
    weight_decay = float(weight_decay)
    bc1 = 1.0 - pow_int(beta1, t)
    bc2 = 1.0 - pow_int(beta2, t)
    return StepScalars(
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=float(eps),
        weight_decay=weight_decay,
        decay=(1.0 - lr * weight_decay) if decoupled else 1.0,
        step_size=lr / bc1,
        # IEEE sqrt and division in float64: correctly rounded in CPython and C++
        inv_bc2_sqrt=1.0 / math.sqrt(bc2),
    )


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float64 params compute (and keep state) in float64; every other dtype in float32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _two_prod(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Exact float64 product a*b = hi + lo (Dekker, no FMA). Valid for |a|, |b| < ~1e300."""
    hi = torch.mul(a, b)
    t = torch.mul(a, _SPLIT)
    a_hi = torch.sub(t, torch.sub(t, a))
    a_lo = torch.sub(a, a_hi)
    t = torch.mul(b, _SPLIT)
    b_hi = torch.sub(t, torch.sub(t, b))
    b_lo = torch.sub(b, b_hi)
    lo = torch.sub(torch.mul(a_hi, b_hi), hi)
    lo = torch.add(lo, torch.mul(a_hi, b_lo))
    lo = torch.add(lo, torch.mul(a_lo, b_hi))
    lo = torch.add(lo, torch.mul(a_lo, b_lo))
    return hi, lo


def _exact_product_gt(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x > a*b exactly (all three are of x's dtype, float32 or float64; a*b close to x)."""
    if x.dtype == torch.float32:
        # A product of two float32 values has at most 48 significant bits: exact in float64.
        return x.double() > torch.mul(a.double(), b.double())
    hi, lo = _two_prod(a, b)
    # hi is within a factor 2 of x, so x - hi is exact (Sterbenz); then x > hi + lo <=> x - hi > lo.
    return torch.sub(x, hi) > lo


def sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded square root of a float32 or float64 tensor, on any device.

    torch's CPU ``sqrt`` may be 1 ulp off; this takes it as a first guess ``r`` and moves to a
    neighbour when the exact comparison says the true root lies past the midpoint:

    * up when x > r * r_up: the midpoint squared is r*r_up + u**2/4, and x - r*r_up is a multiple of
      u**2 (u = r_up - r, x has at least the granularity of r**2), so "x > mid**2" is "x > r*r_up";
    * down when x <= r_dn * r, by the same argument.

    The products are exact (float64 for float32 inputs; Dekker's two-product for float64). Zero,
    inf and NaN pass through unchanged. float64 inputs outside [2**-900, 2**900] are scaled by an
    even power of two first (exact), so that the two-product neither underflows nor overflows.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sqrt_rn: expected float32 or float64, got {x.dtype}")
    if x.dtype == torch.float32:
        # A float64 root rounded to float32 is at most 1 float32-ulp off even if float64 is 1 ulp off.
        return _sqrt_rn_core(x, torch.sqrt(x.double()).float())
    small = x < 2.0**-900
    big = x > 2.0**900
    xs = torch.where(small, torch.mul(x, 2.0**200), torch.where(big, torch.mul(x, 2.0**-200), x))
    r = _sqrt_rn_core(xs, torch.sqrt(xs))
    return torch.where(small, torch.mul(r, 2.0**-100), torch.where(big, torch.mul(r, 2.0**100), r))


def _sqrt_rn_core(x: Tensor, r: Tensor) -> Tensor:
    """Moves the first guess ``r`` of sqrt(x) to the correctly rounded root (see sqrt_rn)."""
    inf = torch.full((), math.inf, dtype=x.dtype, device=x.device)
    r_up = torch.nextafter(r, inf)
    r_dn = torch.nextafter(r, torch.zeros_like(inf))
    go_up = _exact_product_gt(x, r, r_up)
    go_dn = torch.logical_not(_exact_product_gt(x, r_dn, r))
    special = torch.logical_or(r == 0, torch.logical_not(torch.isfinite(r)))
    out = torch.where(go_up, r_up, torch.where(go_dn, r_dn, r))
    return torch.where(special, r, out)


def _scalar(x: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A 0-dim tensor holding x rounded once to the math dtype (torch rounds float64 -> float32
    # to nearest even), so no op ever sees a Python float that it might round differently.
    return torch.tensor(x, dtype=torch.float64).to(dtype=dtype, device=device)


def _read_step(step: Tensor) -> int:
    value = float(step)
    if value != math.floor(value) or value < 1:
        raise ValueError(f"onepass: step count must be a positive integer after increment, got {value}")
    return int(value)


# ---- low-precision state and params (ARCHITECTURE.md section 2) ----------------------------------

#: Optimizer-state formats: "fp32" (the math dtype: float32, float64 for float64 params), "bf16"
#: (moments rounded stochastically to bfloat16) and "int8" (blockwise 8-bit codes + absmax).
STATE_FORMATS = ("fp32", "bf16", "int8")
#: How a bf16 param is written back: to nearest even, stochastically, or with a bf16 Kahan
#: compensation buffer carrying what the rounding lost.
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
#: int8 state: elements per block (one float32 absmax each), blocks never crossing a dim-0 row.
INT8_BLOCK = 256
#: Random-stream numbers of the counter-based hash: the param and the two bf16 moments.
STREAM_PARAM, STREAM_M, STREAM_V = 0, 1, 2

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


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: Tensor,
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    state_format: str = "fp32",
    exp_avg_absmax: Optional[Tensor] = None,
    exp_avg_sq_absmax: Optional[Tensor] = None,
    param_rounding: str = "nearest",
    kahan_comp: Optional[Tensor] = None,
    seed: int = 0,
    qtables: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> None:
    """One Adam(W) step of one tensor, in place: param, exp_avg, exp_avg_sq, max_exp_avg_sq, step.

    ``step`` is the 0-dim step-count tensor of the param's state; it is incremented first and the
    scalars use the new count. See the module docstring for the exact order of operations.

    Low precision (module docstring, "Storage"): ``state_format`` "bf16" keeps bf16 moments,
    "int8" uint8 codes with float32 ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` (quant.tables()
    gives ``qtables``); ``param_rounding`` "stochastic" or "kahan" (with ``kahan_comp``, a bf16
    tensor like the param) for bf16 params; ``seed`` keys the random streams.
    ``stats``: a float64 tensor of 2 elements that receives :func:`update_statistics` of this step
    (left as it is on a step that found_inf skips).
    """
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    old = param.detach().clone() if stats is not None else None
    step.add_(1)
    t = _read_step(step)
    s = step_scalars(t, float(lr), beta1, beta2, eps, weight_decay, decoupled)
    flags = dict(amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale)
    low = dict(fmt=state_format, absmax_m=exp_avg_absmax, absmax_v=exp_avg_sq_absmax,
               rounding=param_rounding, comp=kahan_comp, seed=seed, t=t, qtables=qtables)
    tensors = [param, grad, exp_avg, exp_avg_sq] + ([max_exp_avg_sq] if amsgrad else [])
    if kahan_comp is not None:
        tensors.append(kahan_comp)
    if param.numel() > _CHUNK and all(t_.is_contiguous() for t_ in tensors):
        # The math is elementwise (per block for int8), so slices of whole rows give the same
        # bits; slicing bounds the temporaries (the float64 square-root check needs ~10x the
        # tensor's bytes) for 2**30-element tensors.
        rows, length = int8_rows(param.shape) if state_format == "int8" else (param.numel(), 1)
        step_rows = max(1, _CHUNK // max(length, 1))
        flat = [x.reshape(rows, -1) for x in tensors]
        for r in range(0, rows, step_rows):
            part = [x[r:r + step_rows] for x in flat]
            extra = dict(low, base=r * length)
            if state_format == "int8":
                extra["absmax_m"] = exp_avg_absmax[r:r + step_rows]
                extra["absmax_v"] = exp_avg_sq_absmax[r:r + step_rows]
            if kahan_comp is not None:
                extra["comp"] = part[-1]
            _update(*part[:4], part[4] if amsgrad else None, s, **flags, **extra)
    else:
        _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, **flags, **low)
    if stats is not None:
        sums = update_statistics(old, param, state_format == "int8")
        stats.copy_(torch.tensor(sums, dtype=torch.float64))


_CHUNK = 1 << 24

# ---- fused statistics ----------------------------------------------------------------------------
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


def _load_moment(x: Tensor, absmax: Optional[Tensor], fmt: str, dt: torch.dtype,
                 code: Optional[Tensor]) -> Tensor:
    if fmt == "int8":
        return dequantize_blocks(x, absmax, code)
    return x.to(dt)  # fp32: as is; bf16: widened exactly


def _store_moment(dst: Tensor, absmax: Optional[Tensor], value: Tensor, fmt: str,
                  mid: Optional[Tensor], key: Optional[int], index: Optional[Tensor],
                  keep_positive: bool = False) -> None:
    if fmt == "int8":
        q, a = quantize_blocks(value, mid, keep_positive)
        dst.copy_(q)
        absmax.copy_(a)
    elif fmt == "bf16":
        dst.copy_(round_bf16_stochastic(value, random_bits(key, index)))
    else:
        dst.copy_(value)


def _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s: StepScalars, *, amsgrad, maximize,
            decoupled, grad_scale, fmt="fp32", absmax_m=None, absmax_v=None, rounding="nearest",
            comp=None, seed=0, t=0, qtables=None, base=0) -> None:
    """The element math of the module docstring on one tensor (or slice of whole rows), in place.
    ``base`` is the slice's first element index (the random streams are keyed by it)."""
    dt = math_dtype(param.dtype)
    dev = param.device

    def c(x: float) -> Tensor:
        return _scalar(x, dt, dev)

    stochastic = rounding == "stochastic" and param.dtype == torch.bfloat16
    index = None
    if fmt == "bf16" or stochastic:
        index = torch.add(element_index(param, contiguous_walk=fmt == "int8"), base)
    codes = (None,) * 4
    if fmt == "int8":
        from .quant import CODE_M, CODE_V, MID_M, MID_V, TABLES_LEN  # noqa: PLC0415

        tab = qtables.to(dev)
        codes = (tab[CODE_M:MID_M], tab[MID_M:CODE_V], tab[CODE_V:MID_V], tab[MID_V:TABLES_LEN])

    p = param.to(dt)
    if comp is not None:
        p = torch.add(p, comp.to(dt))  # Kahan: the param's value is p + its compensation
    g = grad.to(dt)
    if grad_scale is not None:
        g = torch.div(g, grad_scale.to(dtype=dt, device=dev))
    if maximize:
        g = torch.neg(g)
    if not decoupled:
        g = torch.add(g, torch.mul(c(s.weight_decay), p))
    m0 = _load_moment(exp_avg, absmax_m, fmt, dt, codes[0])
    v0 = _load_moment(exp_avg_sq, absmax_v, fmt, dt, codes[2])
    m = torch.add(torch.mul(c(s.beta1), m0), torch.mul(c(s.one_minus_beta1), g))
    v = torch.add(torch.mul(c(s.beta2), v0), torch.mul(c(s.one_minus_beta2), torch.mul(g, g)))
    vh = v
    if amsgrad:
        vh = torch.maximum(max_exp_avg_sq, v)
        max_exp_avg_sq.copy_(vh)
    denom = torch.add(torch.mul(sqrt_rn(vh), c(s.inv_bc2_sqrt)), c(s.eps))
    p = torch.sub(torch.mul(p, c(s.decay)), torch.mul(c(s.step_size), torch.div(m, denom)))
    key_m = stream_key(seed, t, STREAM_M) if fmt == "bf16" else None
    key_v = stream_key(seed, t, STREAM_V) if fmt == "bf16" else None
    _store_moment(exp_avg, absmax_m, m, fmt, codes[1], key_m, index)
    _store_moment(exp_avg_sq, absmax_v, v, fmt, codes[3], key_v, index, keep_positive=True)
    if stochastic:
        param.copy_(round_bf16_stochastic(p, random_bits(stream_key(seed, t, STREAM_PARAM), index)))
    elif comp is not None:
        stored = p.to(param.dtype)  # nearest even
        comp.copy_(torch.sub(p, stored.to(dt)).to(comp.dtype))
        param.copy_(stored)
    else:
        param.copy_(p)  # rounds to nearest even for bf16/fp16 params


def adam_step_batch_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    state_format: str = "fp32",
    exp_avg_absmaxs: Sequence[Tensor] = (),
    exp_avg_sq_absmaxs: Sequence[Tensor] = (),
    param_rounding: str = "nearest",
    kahan_comps: Sequence[Tensor] = (),
    seed: int = 0,
    qtables: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> None:
    """:func:`adam_step_` over the lists of one batch (the reference backend's whole job).
    ``stats``: float64 [len(params), 2] that receives each param's :func:`update_statistics`."""
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    int8 = state_format == "int8"
    for i, (p, g, m, v, st) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        adam_step_(
            p, g, m, v, max_exp_avg_sqs[i] if amsgrad else None, st,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale,
            state_format=state_format,
            exp_avg_absmax=exp_avg_absmaxs[i] if int8 else None,
            exp_avg_sq_absmax=exp_avg_sq_absmaxs[i] if int8 else None,
            param_rounding=param_rounding,
            kahan_comp=kahan_comps[i] if param_rounding == "kahan" else None,
            seed=seed, qtables=qtables, stats=stats[i] if stats is not None else None,
        )
