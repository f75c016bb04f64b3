"""The arithmetic of onepass, stated once in plain PyTorch: this file (the scalars and the update)
and, re-exported here, reference_lowp.py (storage), reference_sqrt.py (the correctly rounded
square root) and reference_stats.py (the fused statistics).

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

Storage (low precision; each rule is one function of reference_lowp.py, read as reference.X):

* ``state_format="bf16"``: m and v are stored as bfloat16, widened exactly on load and rounded
  **stochastically** on store (:func:`round_bf16_stochastic`: nearest rounding would freeze v,
  since (1 - beta2) * v = 0.001 v is below half a bf16 ulp of v); one draw of random bits an
  element serves both (:func:`moment_bits`: m the low 16 bits, v the high 16).
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

# The low-precision storage rules (module docstring "Storage"), in their own file; read here as
# reference.X like every other rule (__all__ below lists them).
from .reference_lowp import (INT8_BLOCK, PARAM_ROUNDINGS, STATE_FORMATS, STREAM_MOMENTS,
                             STREAM_PARAM, absmax_shape, dequantize_blocks, element_index, int8_rows,
                             math_dtype, mix32, moment_bits, quantize_blocks, random_bits,
                             round_bf16_stochastic, stream_key)
# The correctly rounded square root, and the fused statistics' rule, likewise.
from .reference_sqrt import sqrt_rn
from .reference_stats import (STATS_CHUNK, STATS_GROUP, STATS_LANES, chunk_partials,
                              sequential_sum, update_statistics)

__all__ = [
    "StepScalars",
    "step_scalars",
    "pow_int",
    "sqrt_rn",
    "math_dtype",
    "PARAM_DTYPES",
    "adam_step_",
    "adam_step_batch_",
    # reference_lowp.py
    "STATE_FORMATS",
    "PARAM_ROUNDINGS",
    "INT8_BLOCK",
    "STREAM_PARAM",
    "STREAM_MOMENTS",
    "mix32",
    "moment_bits",
    "stream_key",
    "random_bits",
    "round_bf16_stochastic",
    "element_index",
    "int8_rows",
    "absmax_shape",
    "dequantize_blocks",
    "quantize_blocks",
    # reference_stats.py
    "STATS_CHUNK",
    "STATS_LANES",
    "STATS_GROUP",
    "chunk_partials",
    "sequential_sum",
    "update_statistics",
]

#: The param dtypes onepass updates (state is float32 for the 16-bit ones, float64 for float64).
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

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

def _load_moment(x: Tensor, absmax: Optional[Tensor], fmt: str, dt: torch.dtype,
                 code: Optional[Tensor]) -> Tensor:
    if fmt == "int8":
        return dequantize_blocks(x, absmax, code)
    return x.to(dt)  # fp32: as is; bf16: widened exactly


def _store_moment(dst: Tensor, absmax: Optional[Tensor], value: Tensor, fmt: str,
                  mid: Optional[Tensor], bits: Optional[Tensor], keep_positive: bool = False) -> None:
    if fmt == "int8":
        q, a = quantize_blocks(value, mid, keep_positive)
        dst.copy_(q)
        absmax.copy_(a)
    elif fmt == "bf16":
        dst.copy_(round_bf16_stochastic(value, bits))
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
    bits_m = bits_v = None
    if fmt == "bf16":
        bits_m, bits_v = moment_bits(random_bits(stream_key(seed, t, STREAM_MOMENTS), index))
    _store_moment(exp_avg, absmax_m, m, fmt, codes[1], bits_m)
    _store_moment(exp_avg_sq, absmax_v, v, fmt, codes[3], bits_v, keep_positive=True)
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
