"""Accuracy: drift from torch.optim.AdamW with fp32 state on identical params and gradients."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .cases import (ACCURACY_DECADES, ACCURACY_SHAPES, ACCURACY_STEPS, ACCURACY_ZERO_FRACTION, BETAS,
                    EPS, LR, WEIGHT_DECAY, Factory, Shape)
from .contestants import _reason
from .timing import _sync


# ---------------------------------------------------------------------------------------------------
# Accuracy: drift from torch.optim.AdamW with fp32 state on identical params and gradients
# ---------------------------------------------------------------------------------------------------



def accuracy_grads(shapes: Sequence[Shape] = ACCURACY_SHAPES, steps: int = ACCURACY_STEPS,
                   device: str | torch.device = "cpu", seed: int = 0,
                   decades: float = ACCURACY_DECADES,
                   zero_fraction: float = ACCURACY_ZERO_FRACTION) -> Iterable[list[torch.Tensor]]:
    """The gradients of the accuracy protocol, one list per step, the same for every contestant.

    Element ``i`` gets ``scale_i * N(0, 1)`` at every step, with ``scale_i = 10**(-D u_i)``,
    ``u_i`` uniform in [0, 1) and fixed, D = ``decades``: in every 256-element block the
    magnitudes span D decades, so the squares in the second moment span 2D. At each step a fresh
    ``zero_fraction`` of the elements gets an exact zero (a ReLU unit that did not fire, an
    embedding row absent from the batch). The largest scale is 1, so eps (1e-8) stays far below
    every sqrt(v) that is not a quantization artefact (the protocol compares state precision, not
    where an optimizer adds eps), and the failure below is not hidden by small gradients.

    Why this finds the failure of blockwise 8-bit state: a block's codes are scaled by its absmax,
    so the second moment of a small element, ~(g/g_max)**2 of the block's largest and smaller still
    once the large elements' v has grown over the steps, falls below the smallest nonzero code
    (3.25e-7 of the absmax in the dynamic maps of bitsandbytes and torchao, 2**-32 in onepass's
    float3 map) and dequantizes to 0 while its first moment, ~g/g_max, still has a code. A step
    whose gradient is exactly zero then divides m by ``0 + eps``: the update is ``lr * m / eps``
    instead of about ``lr``. Each ingredient widens the window: at one scale only randn's rare
    near-zero values fall into it, and a tiny nonzero gradient divides m by about
    ``sqrt(1 - beta2) * |g|`` instead of eps. Relative errors measured on the 2-core EPYC
    (100 steps; one scale with zeros / four decades without zeros / both): onepass int8 6.1e-2 /
    7.2e-2 / 8.1, bitsandbytes AdamW8bit 2.3e-2 / 0.51 / 0.51, torchao AdamW8bit 64 / 35 / 2.8e3.
    torchao's own test (Linear-ReLU-Linear, 2 steps) shows it when its ReLU units are inactive."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    scales = [torch.pow(10.0, torch.rand(s, generator=gen, device=device) * -decades) for s in shapes]
    for _ in range(steps):
        grads = []
        for sc in scales:
            g = torch.randn(sc.shape, generator=gen, device=device).mul_(sc)
            zero = torch.rand(sc.shape, generator=gen, device=device) < zero_fraction
            grads.append(g.masked_fill_(zero, 0.0))
        yield grads


def accumulated_update(factory: Factory, shapes: Sequence[Shape] = ACCURACY_SHAPES,
                       steps: int = ACCURACY_STEPS, device: str | torch.device = "cpu",
                       seed: int = 0, decades: float = ACCURACY_DECADES,
                       zero_fraction: float = ACCURACY_ZERO_FRACTION) -> torch.Tensor:
    """``steps`` steps of ``factory``'s optimizer on fp32 params ``randn * 0.02`` with the protocol's
    gradients; returns params after minus params before, flattened, in float64 on the CPU."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    start = [torch.randn(s, generator=gen, device=device).mul_(0.02) for s in shapes]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = factory(params)
    for grads in accuracy_grads(shapes, steps, device, seed, decades, zero_fraction):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    _sync(device)
    return torch.cat([(p.detach().double() - q.double()).flatten() for p, q in zip(params, start)]).cpu()


def accuracy(factory: Factory, reference: torch.Tensor | None = None, *, lr: float = LR,
             weight_decay: float = WEIGHT_DECAY, steps: int = ACCURACY_STEPS,
             shapes: Sequence[Shape] = ACCURACY_SHAPES, device: str | torch.device = "cpu",
             seed: int = 0, decades: float = ACCURACY_DECADES,
             zero_fraction: float = ACCURACY_ZERO_FRACTION) -> dict[str, Any]:
    """Drift of ``factory``'s optimizer from ``torch.optim.AdamW`` (fp32 state, same lr and weight
    decay) after ``steps`` steps on identical params and gradients (``accumulated_update``).

    Returns ``max_abs`` = max |Δ - Δ_ref| (in param units; lr * steps bounds |Δ_ref| from weight
    decay aside), ``rel`` = ‖Δ - Δ_ref‖ / ‖Δ_ref‖ (Euclidean norms over all elements), ``ref_max``
    = max |Δ_ref|, ``finite`` and ``steps``. A non-finite Δ gives ``max_abs``/``rel`` None and
    ``finite`` False. ``reference`` (Δ_ref) may be passed to avoid recomputing it."""
    if reference is None:
        reference = accumulated_update(_reference_factory(lr, weight_decay), shapes, steps, device,
                                       seed, decades, zero_fraction)
    delta = accumulated_update(factory, shapes, steps, device, seed, decades, zero_fraction)
    finite = bool(torch.isfinite(delta).all())
    diff = delta - reference
    ref_norm = float(reference.norm())
    return {
        "steps": steps,
        "decades": decades,
        "max_abs": float(diff.abs().max()) if finite else None,
        "rel": float(diff.norm()) / ref_norm if finite and ref_norm > 0 else None,
        "ref_max": float(reference.abs().max()),
        "finite": finite,
    }


def _reference_factory(lr: float, weight_decay: float) -> Factory:
    return lambda ps: torch.optim.AdamW(ps, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                                        foreach=False)


def measure_accuracy(factories: dict[str, Factory], device: str | torch.device = "cpu", *,
                     lr: float = LR, weight_decay: float = WEIGHT_DECAY, steps: int = ACCURACY_STEPS,
                     shapes: Sequence[Shape] = ACCURACY_SHAPES, seed: int = 0,
                     progress: Any = None) -> dict[str, dict[str, Any]]:
    """``accuracy`` for every factory against one reference run. A contestant that fails here gets
    ``{"error": reason}`` (and keeps its speed figures)."""
    reference = accumulated_update(_reference_factory(lr, weight_decay), shapes, steps, device, seed)
    out: dict[str, dict[str, Any]] = {}
    for n, factory in factories.items():
        if progress is not None:
            progress.set_postfix_str(f"accuracy {n}")
        try:
            out[n] = accuracy(factory, reference, lr=lr, weight_decay=weight_decay, steps=steps,
                              shapes=shapes, device=device, seed=seed)
        except Exception as e:  # noqa: BLE001 - a peer's failure is reported, never fatal
            out[n] = {"steps": steps, "error": _reason(e)}
        if progress is not None:
            progress.update(1)
    return out
