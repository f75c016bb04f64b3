"""The reference's square root, correctly rounded (IEEE sqrt) from torch ops: torch's CPU
``sqrt`` is not (about 15% of random float32 inputs and 1% of float64 inputs are 1 ulp off on
torch 2.13), and every backend's kernel uses the hardware's correctly rounded one. reference.py
re-exports sqrt_rn."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Veltkamp's splitting constant for float64: 2**27 + 1 splits a 53-bit significand into two
# 26-bit halves whose products are exact.
_SPLIT = 134217729.0


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
