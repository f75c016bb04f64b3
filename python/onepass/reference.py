"""The arithmetic of onepass, stated once in plain PyTorch.

Every backend (cpu, cuda, triton) must produce exactly these bits (``torch.equal``) for the same
inputs. The C++ twin of this file is ``csrc/adam_math.h``; the two are kept in step by the tests.

Per-step scalars (host, float64, IEEE ops only, then rounded once to the math dtype)::

    t         = step count after the increment (an integer)
    bc1       = 1 - beta1**t            (beta**t by binary exponentiation: multiplications only)
    bc2       = 1 - beta2**t
    step_size = lr / bc1
    bc2_sqrt  = sqrt(bc2)
    decay     = 1 - lr * weight_decay   (decoupled mode; 1 in coupled mode)
    beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay

Element math, in the math dtype (float32; float64 for float64 params), one correctly rounded
operation at a time, in exactly this order::

    g  = grad                     (converted to the math dtype)
    g  = g / grad_scale           (only when a GradScaler hands over grad_scale)
    g  = -g                       (maximize)
    g  = g + weight_decay * p     (coupled mode: Adam + L2)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * (g * g)
    vh = max(v_max, v); v_max = vh          (amsgrad; else vh = v)
    p  = p * decay - step_size * (m / (sqrt(vh) / bc2_sqrt + eps))

``p`` is read from the param (bf16/fp16 widened exactly) and written back rounded to nearest even.
State (m, v, v_max) is float32 for float32/bf16/fp16 params and float64 for float64 params.

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
    bc2_sqrt: float

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
            self.bc2_sqrt,
        )


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
        bc2_sqrt=math.sqrt(bc2),  # IEEE sqrt in float64: correctly rounded in CPython and C++
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
) -> None:
    """One Adam(W) step of one tensor, in place: param, exp_avg, exp_avg_sq, max_exp_avg_sq, step.

    ``step`` is the 0-dim step-count tensor of the param's state; it is incremented first and the
    scalars use the new count. See the module docstring for the exact order of operations.
    """
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    step.add_(1)
    s = step_scalars(_read_step(step), float(lr), beta1, beta2, eps, weight_decay, decoupled)
    flags = dict(amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale)
    tensors = [param, grad, exp_avg, exp_avg_sq] + ([max_exp_avg_sq] if amsgrad else [])
    if param.numel() > _CHUNK and all(t.is_contiguous() for t in tensors):
        # The math is elementwise, so slices give the same bits; slicing bounds the temporaries
        # (the float64 square-root check needs ~10x the tensor's bytes) for 2**30-element tensors.
        flat = [t.view(-1) for t in tensors]
        for i in range(0, param.numel(), _CHUNK):
            part = [t[i:i + _CHUNK] for t in flat]
            _update(*part[:4], part[4] if amsgrad else None, s, **flags)
    else:
        _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s, **flags)


_CHUNK = 1 << 24


def _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s: StepScalars, *, amsgrad, maximize,
            decoupled, grad_scale) -> None:
    """The element math of the module docstring on one tensor (or slice), in place."""
    dt = math_dtype(param.dtype)
    dev = param.device

    def c(x: float) -> Tensor:
        return _scalar(x, dt, dev)

    p = param.to(dt)
    g = grad.to(dt)
    if grad_scale is not None:
        g = torch.div(g, grad_scale.to(dtype=dt, device=dev))
    if maximize:
        g = torch.neg(g)
    if not decoupled:
        g = torch.add(g, torch.mul(c(s.weight_decay), p))
    m = torch.add(torch.mul(c(s.beta1), exp_avg), torch.mul(c(s.one_minus_beta1), g))
    v = torch.add(torch.mul(c(s.beta2), exp_avg_sq), torch.mul(c(s.one_minus_beta2), torch.mul(g, g)))
    vh = v
    if amsgrad:
        vh = torch.maximum(max_exp_avg_sq, v)
        max_exp_avg_sq.copy_(vh)
    denom = torch.add(torch.div(sqrt_rn(vh), c(s.bc2_sqrt)), c(s.eps))
    p = torch.sub(torch.mul(p, c(s.decay)), torch.mul(c(s.step_size), torch.div(m, denom)))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
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
) -> None:
    """:func:`adam_step_` over the lists of one batch (the reference backend's whole job)."""
    if found_inf is not None and bool(found_inf.item() != 0):
        return
    for i, (p, g, m, v, st) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        adam_step_(
            p, g, m, v, max_exp_avg_sqs[i] if amsgrad else None, st,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, decoupled=decoupled, grad_scale=grad_scale,
        )
