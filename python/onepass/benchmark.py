"""Optimizer-step benchmark: onepass.AdamW against torch's AdamW variants and its peers.

This module is the one definition of the benchmark cases, contestants, byte accounting and accuracy
protocol (ARCHITECTURE.md section 5). ``python -m onepass`` and the pytest-benchmark files under
``bench/`` both use it, so a case means the same thing everywhere.

It imports only the standard library and torch at module level. ``onepass.AdamW`` and every peer
(optimi, bitsandbytes, torchao, matplotlib, tqdm) are imported lazily inside the function that needs
them, and a contestant that cannot be imported or cannot take a step is *skipped with a reason*, never
an error: the benchmark must run on a machine that has none of the peers.

What is measured
----------------
* **Speed.** Every contestant steps the **same** parameter and gradient tensors (each optimizer keeps
  its own state), so all of them see identical shapes, dtypes, alignment and memory placement, and
  the parameters are only allocated once (gpt2 is 0.5 GB of params plus 0.5 GB of grads in fp32).
  After a warm-up (which creates the lazily allocated state and, for torchao, compiles), the
  contestants and the bandwidth ceiling take turns: one step each per round, in an order rotated
  every round, so clock, thermal and neighbour drift hit all of them alike. The figure reported is
  the median over rounds. A contestant whose warm-up steps say that ``rounds`` steps would exceed
  the time budget (``budget_s``, per contestant and case) takes part in fewer rounds, at least
  ``min_rounds``, spread evenly over the run; the table says how many each got. Warm-up steps
  (the first one includes torch.compile for torchao) are timed and reported apart, never in the
  median.
* **Effective bandwidth** = bytes an AdamW step must move / time. For each parameter element: read
  param, grad and the state, write param and state. With fp32 params and fp32 state that is
  4 + 4 + 8 (read) + 4 + 8 (write) = 28 bytes. The ceiling is measured in the same run: on CPU an
  in-place ``x.mul_(c)`` on a float32 buffer four times the case's element count (read + write,
  large enough to leave the caches, like the step's four streams), on GPU a device-to-device
  ``dst.copy_(src)``.
* **Memory.** State bytes per param are measured from each optimizer's own state after warm-up
  (``state_nbytes``): every tensor reachable from ``optimizer.state``, tensor subclasses (torchao's
  low-bit state) counted through their inner tensors, quantization maps and absmax tensors
  (bitsandbytes, onepass int8) included, each buffer once.
* **Accuracy** (``accuracy``): each contestant and ``torch.optim.AdamW`` with fp32 state step
  identical fp32 params with identical gradients for ``ACCURACY_STEPS`` steps; reported are the max
  and the norm-wise relative error of the accumulated update (params after minus params before).
  The gradients are built to find the failure of blockwise 8-bit state: within every 256-element
  block their magnitudes span ``ACCURACY_DECADES`` decades, and a quarter of them are exactly zero
  at each step (see ``accuracy_grads``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib.metadata
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "LR",
    "WEIGHT_DECAY",
    "BETAS",
    "EPS",
    "GPT2_TENSORS",
    "GPT2_PARAMS",
    "CASES",
    "DEFAULT_CASES",
    "CONTESTANTS",
    "DEFAULT_CONTESTANTS",
    "REFERENCE_CONTESTANT",
    "Contestant",
    "Ceiling",
    "make_ceiling",
    "gpt2",
    "small",
    "huge",
    "check_gpt2_counts",
    "case_shapes",
    "count_params",
    "parse_dtype",
    "make_params",
    "make_factory",
    "available_contestants",
    "bytes_per_param",
    "state_nbytes",
    "state_tensors",
    "bytes_moved",
    "ACCURACY_SHAPES",
    "ACCURACY_STEPS",
    "ACCURACY_DECADES",
    "ACCURACY_ZERO_FRACTION",
    "accuracy_grads",
    "accumulated_update",
    "accuracy",
    "measure_accuracy",
    "plan_rounds",
    "machine_info",
    "cpu_busy",
    "run_case",
    "run_benchmark",
    "derive",
    "format_table",
    "plot",
    "progress_bar",
    "Timer",
]

Shape = tuple[int, ...]
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

# Hyperparameters every contestant gets. The values do not change the work a step does, but lr must be
# small enough that hundreds of steps on fixed gradients leave the parameters in a normal range.
LR = 1e-4
WEIGHT_DECAY = 1e-2
# Passed to every contestant explicitly: the peers' defaults differ (optimi: betas (0.9, 0.99),
# eps 1e-6), and the accuracy column must compare state precision, not conventions.
BETAS = (0.9, 0.999)
EPS = 1e-8

# ---------------------------------------------------------------------------------------------------
# Cases: functions returning the list of parameter shapes.
# ---------------------------------------------------------------------------------------------------

# Above this share of the CPU used by other processes (before or during a run), the table warns.
BUSY_WARNING = 0.2

GPT2_TENSORS = 148
GPT2_PARAMS = 124_439_808


def gpt2(n_layer: int = 12, vocab: int = 50257, ctx: int = 1024, d: int = 768) -> list[Shape]:
    """GPT-2 small parameter shapes in Hugging Face order (Conv1D weights are (in, out)).

    With the defaults: 148 tensors, 124,439,808 parameters (see ``check_gpt2_counts``). Smaller
    arguments give the same structure for smoke runs (``--quick``)."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),                    # ln_1 weight, bias
            (d, 3 * d), (3 * d,),          # attn.c_attn weight, bias
            (d, d), (d,),                  # attn.c_proj weight, bias
            (d,), (d,),                    # ln_2 weight, bias
            (d, 4 * d), (4 * d,),          # mlp.c_fc weight, bias
            (4 * d, d), (d,),              # mlp.c_proj weight, bias
        ]
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


def small(n_tensors: int = 2000, numel: int = 4096) -> list[Shape]:
    """Many small tensors: measures per-tensor overhead rather than bandwidth."""
    return [(numel,)] * n_tensors


def huge(device: str | torch.device = "cpu", quick: bool = False) -> list[Shape]:
    """One big tensor: 2**27 elements on CPU, 2**30 on GPU (2**20 when ``quick``)."""
    if quick:
        return [(2**20,)]
    return [(2**30,)] if torch.device(device).type == "cuda" else [(2**27,)]


def count_params(shapes: Iterable[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def check_gpt2_counts(shapes: Sequence[Shape] | None = None) -> None:
    """Assert that the gpt2 case is GPT-2 small: 148 tensors, 124,439,808 parameters."""
    shapes = gpt2() if shapes is None else shapes
    assert len(shapes) == GPT2_TENSORS, f"gpt2 case has {len(shapes)} tensors, expected {GPT2_TENSORS}"
    n = count_params(shapes)
    assert n == GPT2_PARAMS, f"gpt2 case has {n:,} params, expected {GPT2_PARAMS:,}"


CASES: dict[str, Callable[..., list[Shape]]] = {"gpt2": gpt2, "small": small, "huge": huge}
DEFAULT_CASES = ("gpt2", "small")


def case_shapes(name: str, device: str | torch.device = "cpu", quick: bool = False) -> list[Shape]:
    """Shapes of a named case. ``quick`` shrinks it to a smoke test of the same structure (used by
    the unit tests, which must finish in seconds on a 2-core machine)."""
    if name == "gpt2":
        # d=128 too: --quick must stay fast even when onepass runs on its (slow) reference backend.
        return gpt2(n_layer=1, vocab=1024, ctx=128, d=128) if quick else gpt2()
    if name == "small":
        return small(n_tensors=100) if quick else small()
    if name == "huge":
        return huge(device, quick=quick)
    raise ValueError(f"unknown case {name!r}; known cases: {', '.join(CASES)}")


# ---------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def make_params(shapes: Sequence[Shape], device: str | torch.device = "cpu",
                dtype: str | torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters ``randn * 0.02`` with gradients ``randn * 1e-3`` already attached.

    Gradients are never zero: a zero gradient would let a kernel (or the hardware) take shortcuts that
    a real step cannot. Generated directly on the device so gpt2 does not need a CPU copy."""
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(0.02)
        g = torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(1e-3)
        p = torch.nn.Parameter(p)
        p.grad = g
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------------------
# Contestants
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contestant:
    """``build(params, lr, weight_decay)`` returns an optimizer; it may raise ImportError (or anything
    else) when the contestant is unavailable, which ``available_contestants`` turns into a skip.
    ``cuda_only`` contestants are skipped without trying on other devices. ``slow`` ones can be left
    out of large cases by the caller (``slow_limit``); otherwise the time budget gives them fewer
    rounds. ``peer`` is the distribution whose version the table reports; ``compiles`` says that the
    first step runs torch.compile (its time is reported apart)."""

    name: str
    build: Callable[[list[torch.Tensor], float, float], torch.optim.Optimizer]
    description: str
    slow: bool = False
    cuda_only: bool = False
    default: bool = True
    peer: str | None = None
    compiles: bool = False


def _onepass(backend: str, **extra):
    def build(params, lr, weight_decay):
        # Imported here, not at module level: the benchmark must run (and report onepass as skipped)
        # while the optimizer is missing or broken, and `import onepass.benchmark` must stay cheap.
        try:
            import onepass
            cls = onepass.AdamW
        except Exception as e:  # ImportError, AttributeError, or whatever a half-written package raises
            raise ImportError(f"onepass.AdamW not importable ({type(e).__name__}: {e})") from e
        return cls(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, backend=backend,
                   **extra)
    return build


def _torch(**kw):
    def build(params, lr, weight_decay):
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, **kw)
    return build


@contextlib.contextmanager
def _quiet_import():
    """Silence what a peer's import logs while it probes for optional parts (torchao logs a warning
    for each CUDA library it cannot load on a CPU-only machine; torch warns about its pytree enums)."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "bitsandbytes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _optimi(params, lr, weight_decay):
    import optimi  # torch-optimi
    return optimi.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)


def _bitsandbytes(bits: int):
    def build(params, lr, weight_decay):
        with _quiet_import():
            import bitsandbytes as bnb
        if bits == 8:
            return bnb.optim.AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
        return bnb.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                               optim_bits=32)
    return build


def _torchao(cls_name: str):
    """torchao.optim's AdamW8bit / AdamW4bit / AdamWFp8 (tensor-subclass state, one torch.compile'd
    function per param) or ``_AdamW`` (its full-precision one). Older releases keep them in
    torchao.prototype.low_bit_optim."""
    def build(params, lr, weight_decay):
        with _quiet_import():
            try:
                import torchao.optim as ao
            except ImportError:
                import torchao.prototype.low_bit_optim as ao
        return getattr(ao, cls_name)(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    return build


CONTESTANTS: dict[str, Contestant] = {
    c.name: c
    for c in [
        Contestant("onepass", _onepass("auto"), 'onepass.AdamW(backend="auto")'),
        # Low-precision state: bf16 moments (4 B/param) and blockwise 8-bit moments (~2.03 B/param).
        Contestant("onepass-bf16", _onepass("auto", state_dtype="bf16"),
                   'onepass.AdamW(state_dtype="bf16")'),
        Contestant("onepass-int8", _onepass("auto", state_dtype="int8"),
                   'onepass.AdamW(state_dtype="int8")'),
        Contestant("torch-fused", _torch(fused=True), "torch.optim.AdamW(fused=True)"),
        Contestant("torch-foreach", _torch(foreach=True), "torch.optim.AdamW(foreach=True)"),
        Contestant("torch-forloop", _torch(foreach=False), "torch.optim.AdamW(foreach=False)",
                   slow=True),
        Contestant("optimi", _optimi, "optimi.AdamW (torch-optimi)", peer="torch-optimi"),
        Contestant("bitsandbytes", _bitsandbytes(32), "bitsandbytes.optim.AdamW(optim_bits=32)",
                   peer="bitsandbytes"),
        Contestant("bitsandbytes-8bit", _bitsandbytes(8), "bitsandbytes.optim.AdamW8bit",
                   slow=True, peer="bitsandbytes"),
        Contestant("torchao-8bit", _torchao("AdamW8bit"), "torchao.optim.AdamW8bit",
                   slow=True, peer="torchao", compiles=True),
        Contestant("torchao-4bit", _torchao("AdamW4bit"), "torchao.optim.AdamW4bit",
                   slow=True, peer="torchao", compiles=True),
        Contestant("torchao-fp8", _torchao("AdamWFp8"), "torchao.optim.AdamWFp8",
                   slow=True, peer="torchao", compiles=True),
        # Not run by default: torchao's full-precision AdamW (a private class) ...
        Contestant("torchao", _torchao("_AdamW"), "torchao.optim._AdamW", slow=True,
                   default=False, peer="torchao", compiles=True),
        # ... the fused statistics (‖w‖, ‖Δw‖ per param inside the pass), their cost next to
        # "onepass" ...
        Contestant("onepass-stats", _onepass("auto", statistics=True),
                   'onepass.AdamW(statistics=True)', default=False),
        # ... and a named backend, to compare onepass's own backends side by side.
        *[Contestant(f"onepass-{b}", _onepass(b), f'onepass.AdamW(backend="{b}")', default=False)
          for b in ("reference", "cpu", "cuda", "triton")],
    ]
}
DEFAULT_CONTESTANTS = tuple(n for n, c in CONTESTANTS.items() if c.default)
REFERENCE_CONTESTANT = "torch-fused"  # ratios are time(torch-fused) / time(contestant)


def make_factory(name: str, lr: float = LR, weight_decay: float = WEIGHT_DECAY) -> Factory:
    """``factory(params) -> optimizer`` for a contestant name (no availability check)."""
    try:
        c = CONTESTANTS[name]
    except KeyError:
        raise ValueError(f"unknown contestant {name!r}; known: {', '.join(CONTESTANTS)}") from None
    return lambda params: c.build(params, lr, weight_decay)


def _onepass_backend(name: str, device: torch.device) -> str | None:
    """Which onepass backend a contestant runs on (what "auto" resolves to), or None if unknown.

    Best effort and informative only: a figure for the reference backend means something quite
    different from one for a compiled kernel, so the table shows it next to the name."""
    if name != "onepass" and not name.startswith("onepass-"):
        return None
    requested = name[len("onepass-"):]
    if name == "onepass" or requested in ("bf16", "int8", "stats"):
        requested = "auto"
    try:
        from onepass.backends import resolve_backend
        return str(resolve_backend(requested, device).name)
    except Exception:  # noqa: BLE001 - the package may not have (or may have changed) this helper
        return None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    if isinstance(e, ImportError) and not isinstance(e, ModuleNotFoundError) and text:
        return text[:200]
    if isinstance(e, ModuleNotFoundError):
        return f"not installed ({text})"[:200]
    return f"{type(e).__name__}: {text}"[:200]


def available_contestants(device: str | torch.device = "cpu", names: Iterable[str] | None = None,
                          dtype: str | torch.dtype = torch.float32, lr: float = LR,
                          weight_decay: float = WEIGHT_DECAY,
                          progress: bool | None = False) -> tuple[dict[str, Factory], dict[str, str]]:
    """Probe contestants on ``device``/``dtype``: ``(factories, skipped)``.

    A contestant is available when it builds and takes two steps on the accuracy protocol's params
    (``ACCURACY_SHAPES``: one of them large enough, and a multiple of every block size, for the
    blockwise 8/4-bit formats to quantize it, so their real path and torch.compile run here);
    otherwise it goes into ``skipped`` with the reason (not installed, no GPU, unsupported dtype or
    device, ...). Unknown names are a caller error (ValueError)."""
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    names = list(DEFAULT_CONTESTANTS if names is None else names)
    for n in names:
        if n not in CONTESTANTS:
            raise ValueError(f"unknown contestant {n!r}; known: {', '.join(CONTESTANTS)}")
    factories: dict[str, Factory] = {}
    skipped: dict[str, str] = {}
    bar = progress_bar(len(names), "probe", progress)
    for n in names:
        bar.set_postfix_str(n)
        bar.update(1)
        c = CONTESTANTS[n]
        if c.cuda_only and device.type != "cuda":
            skipped[n] = "CUDA only"
            continue
        factory = make_factory(n, lr, weight_decay)
        try:
            probe = make_params(ACCURACY_SHAPES, device, dtype, seed=1)
            opt = factory(probe)
            opt.step()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            bad = [i for i, p in enumerate(probe) if not torch.isfinite(p).all()]
            if bad:
                raise RuntimeError(f"non-finite params after two steps (tensor {bad[0]})")
        except Exception as e:  # noqa: BLE001 - any failure of a peer means "skip it", never "fail"
            skipped[n] = _reason(e)
            continue
        finally:
            probe = opt = None  # noqa: F841 - free the probe's state before the next contestant
        factories[n] = factory
    bar.close()
    return factories, skipped


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


# ---------------------------------------------------------------------------------------------------
# Accuracy: drift from torch.optim.AdamW with fp32 state on identical params and gradients
# ---------------------------------------------------------------------------------------------------

# A (64, 1024) weight (65,536 elements: every blockwise format quantizes it, 256 blocks of 256,
# 512 of 128), a bias-like vector and an odd-shaped tensor (kept in fp32 by the 8/4-bit formats).
ACCURACY_SHAPES: list[Shape] = [(64, 1024), (1024,), (3, 5)]
ACCURACY_STEPS = 100
# Gradient magnitudes within a block span this many decades (log-uniform per element; the first
# layer of a ReLU MLP showed max/5th-percentile ratios of 1.7e2 to 5.2e3 per 256-element block) ...
ACCURACY_DECADES = 4.0
# ... and this fraction of the elements gets an exact zero at each step.
ACCURACY_ZERO_FRACTION = 0.25


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


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


class Timer:
    """Milliseconds for one call. CPU: perf_counter. CUDA: events around the call, after a
    synchronize so that earlier queued work (another contestant's step) is not counted and the
    host-side launch overhead of this call is (it shows up as GPU idle time between the events)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return float(self.start.elapsed_time(self.end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class Ceiling:
    """A bandwidth ceiling: ``fn()`` moves ``bytes`` bytes (read + write) using ``buffers``."""

    kind: str
    bytes: int
    fn: Callable[[], Any]
    buffers: tuple[torch.Tensor, ...] = field(repr=False)


def make_ceiling(device: str | torch.device, case_numel: int) -> Ceiling:
    """The bandwidth ceiling for a case of ``case_numel`` parameter elements.

    CPU: in-place ``x.mul_(c)`` on a float32 buffer of 4x the case's element count (the size of the
    step's p, g, m, v working set, so it leaves the caches like the step does); bytes = 2 x buffer.
    GPU: ``dst.copy_(src)``, 4x the case as fp32 but kept between 256 MiB and 1 GiB per buffer: far
    beyond L2, without crowding out the optimizer states on the huge case; bytes = 2 x buffer."""
    device = torch.device(device)
    if device.type == "cuda":
        n = min(max(4 * case_numel, 2**26), 2**28)
        src = torch.ones(n, device=device)
        dst = torch.empty_like(src)
        return Ceiling("copy_", 2 * n * 4, lambda: dst.copy_(src), (src, dst))
    buf = torch.ones(4 * case_numel)
    # Factors 2 and 0.5 alternate so the values stay exactly 1 and 2: no overflow, no denormals.
    factors = (2.0, 0.5)
    flip = [0]

    def fn():
        flip[0] ^= 1
        buf.mul_(factors[flip[0]])

    return Ceiling("mul_", 2 * buf.numel() * 4, fn, (buf,))


class _NoBar:
    """What ``progress_bar`` returns when there is nothing to show: tqdm's methods, doing nothing."""

    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool | None = None, file=None):
    """A tqdm bar on stderr (``enabled=None``: only when stderr is a terminal; False: never), or a
    do-nothing stand-in when tqdm is not installed or the bar is off. The label of the step under
    way goes in ``set_postfix_str``."""
    if enabled is False:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    file = sys.stderr if file is None else file
    if not getattr(file, "isatty", lambda: False)():
        return _NoBar()
    return tqdm(total=total, desc=desc, file=file, leave=False, unit="step", dynamic_ncols=True)


def plan_rounds(step_ms: float | None, rounds: int, budget_s: float | None, min_rounds: int) -> int:
    """How many timed rounds a contestant takes part in: ``rounds``, or fewer when ``rounds`` steps
    of ``step_ms`` would exceed ``budget_s`` seconds, but at least ``min_rounds`` (and never more
    than ``rounds``). No estimate or no budget: ``rounds``."""
    if budget_s is None or step_ms is None or step_ms <= 0 or math.isnan(step_ms):
        return rounds
    fit = int(budget_s * 1e3 // step_ms)
    return max(min(min_rounds, rounds), min(rounds, fit))


def _takes_part(r: int, planned: int, rounds: int) -> bool:
    """Round ``r`` of ``rounds`` is one of the ``planned`` rounds, spread evenly over the run."""
    return (r + 1) * planned // rounds > r * planned // rounds


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(name: str, shapes: Sequence[Shape], factories: dict[str, Factory],
             device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
             rounds: int = 10, warmup: int = 2, skipped: dict[str, str] | None = None,
             slow_limit: int | None = None, progress: bool | None = False,
             seed: int = 0, budget_s: float | None = None, min_rounds: int = 3) -> dict[str, Any]:
    """Time one case. Returns a JSON-serialisable dict (see ``derive`` for the derived fields).

    ``factories`` maps contestant name -> factory(params); all share one set of params/grads.
    Each contestant takes ``warmup`` timed warm-up steps (kept apart: ``warmup_ms``), then up to
    ``rounds`` interleaved rounds: ``plan_rounds`` gives a contestant fewer (at least
    ``min_rounds``) when its steps (the faster of its second warm-up step and the median of its
    timed steps so far, re-planned each round) say ``rounds`` steps would exceed ``budget_s``
    seconds, spread evenly over the rounds. Contestants flagged slow are skipped when the case has
    more than ``slow_limit`` params. A contestant that raises during the run (e.g. out of memory) is
    dropped and listed in ``errors`` instead of aborting the whole benchmark. ``progress``: a tqdm
    bar (None: when stderr is a terminal)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if min_rounds < 1:
        raise ValueError(f"min_rounds must be >= 1, got {min_rounds}")
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    skipped = dict(skipped or {})
    errors: dict[str, str] = {}
    n_params = count_params(shapes)

    names = []
    for n in factories:
        c = CONTESTANTS.get(n)
        if c is not None and c.slow and slow_limit is not None and n_params > slow_limit:
            skipped[n] = f"slow, excluded above {slow_limit:,} params"
        else:
            names.append(n)

    params = make_params(shapes, device, dtype, seed=seed)
    ceiling = make_ceiling(device, n_params)
    timer = Timer(device)
    opts: dict[str, torch.optim.Optimizer] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    warm_times: dict[str, list[float]] = {n: [] for n in names}
    planned: dict[str, int] = {}
    estimates: dict[str, float | None] = {}
    ceil_times: list[float] = []
    bar = progress_bar(len(names) * (warmup + rounds) + rounds, name, progress)

    def fail(n: str, e: BaseException) -> None:
        # Called inside the except block; the memory (e.g. after an OOM) is released by _free once
        # the exception and its traceback are gone.
        errors[n] = _reason(e)
        opts.pop(n, None)
        times.pop(n, None)

    try:
        # Warm-up: builds each optimizer and its state (the first step allocates and page-faults
        # it; torchao's compiles). Timed, to plan the rounds and to report the first step apart.
        for n in names:
            try:
                opts[n] = factories[n](params)
                for _ in range(warmup):
                    bar.set_postfix_str(f"{n} (warm-up)")
                    warm_times[n].append(timer(opts[n].step))
                    bar.update(1)
                _sync(device)
            except Exception as e:  # noqa: BLE001 - drop this contestant, keep the others
                fail(n, e)
            if n in errors:
                _free(device)
                continue
            w = warm_times[n]
            estimates[n] = min(w[1:]) if len(w) > 1 else (w[0] if w else None)
            planned[n] = plan_rounds(estimates[n], rounds, budget_s, min_rounds)
        bar.total = len(names) * warmup + sum(planned.values()) + rounds
        bar.refresh()
        for _ in range(max(1, warmup)):
            ceiling.fn()
        _sync(device)

        # Rounds: every contestant (that takes part in this round) and the ceiling once per round,
        # rotating the order.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one contestant's timing would be noise charged to it
        try:
            for r in range(rounds):
                # Re-plan with the steps timed so far: a second warm-up step can still be slow
                # (first touches), and the plan only ever grows.
                for n in opts:
                    if times[n] and estimates[n] is not None:
                        estimates[n] = min(estimates[n], statistics.median(times[n]))
                        planned[n] = max(planned[n], plan_rounds(estimates[n], rounds, budget_s,
                                                                 min_rounds))
                bar.total = len(names) * warmup + sum(planned.values()) + rounds
                order = ["<ceiling>"] + list(opts)
                k = r % len(order)
                for n in order[k:] + order[:k]:
                    if n == "<ceiling>":
                        bar.set_postfix_str("ceiling")
                        ceil_times.append(timer(ceiling.fn))
                    elif n in opts and _takes_part(r, planned[n], rounds):
                        bar.set_postfix_str(n)
                        try:
                            times[n].append(timer(opts[n].step))
                        except Exception as e:  # noqa: BLE001
                            fail(n, e)
                        if n in errors:
                            _free(device)
                    else:
                        continue
                    bar.update(1)
        finally:
            if gc_was_enabled:
                gc.enable()

        contestants = []
        for n, opt in opts.items():
            sb = state_nbytes(opt)
            ts = times[n]
            entry = {
                "name": n,
                "ms": statistics.median(ts),
                "ms_min": min(ts),
                "ms_all": ts,
                "rounds": len(ts),
                "warmup_ms": warm_times[n],
                "state_bytes": sb,
                # 0 means the optimizer keeps its state outside optimizer.state: assume torch's
                # layout (two state tensors in the param dtype) rather than report nonsense.
                "state_bytes_source": "measured" if sb > 0 else "assumed",
                "bytes_per_step": bytes_moved(params, sb if sb > 0 else None),
            }
            used = getattr(opt, "last_backends", None)  # what onepass's last step ran on
            backend = "+".join(used) if used else _onepass_backend(n, device)
            if backend is not None:
                entry["backend"] = backend
            contestants.append(entry)
        ceiling_ms = statistics.median(ceil_times) if ceil_times else float("nan")
        result = {
            "case": name,
            "n_tensors": len(shapes),
            "n_params": n_params,
            "dtype": _dtype_name(dtype),
            "rounds": rounds,
            "min_rounds": min_rounds,
            "budget_s": budget_s,
            "warmup": warmup,
            "ceiling": {"kind": ceiling.kind, "bytes": ceiling.bytes, "ms": ceiling_ms,
                        "ms_all": ceil_times},
            "contestants": contestants,
            "skipped": skipped,
            "errors": errors,
        }
    finally:
        bar.close()
        opts.clear()
        del params, ceiling
        _free(device)
    return derive(result)


def derive(case: dict[str, Any]) -> dict[str, Any]:
    """Fill in the derived figures of a case result (in place, also returned):

    * ``gbps``  = bytes_per_step / time, for each contestant and for the ceiling
    * ``frac_ceiling`` = gbps / ceiling gbps
    * ``x_torch_fused`` = time(torch-fused) / time(contestant): > 1 means faster than torch fused
      (None when torch-fused is not in this case)."""
    ceil = case["ceiling"]
    ceil["gbps"] = _gbps(ceil["bytes"], ceil["ms"])
    ref = next((c for c in case["contestants"] if c["name"] == REFERENCE_CONTESTANT), None)
    for c in case["contestants"]:
        c["bytes_per_param"] = c["bytes_per_step"] / case["n_params"] if case["n_params"] else None
        c["state_bytes_per_param"] = (c["state_bytes"] / case["n_params"]
                                      if case["n_params"] and c.get("state_bytes") else None)
        c["gbps"] = _gbps(c["bytes_per_step"], c["ms"])
        c["frac_ceiling"] = (c["gbps"] / ceil["gbps"]
                             if c["gbps"] is not None and ceil["gbps"] else None)
        c["x_torch_fused"] = ref["ms"] / c["ms"] if ref is not None and c["ms"] > 0 else None
    return case


def _gbps(nbytes: float, ms: float) -> float | None:
    if not ms or ms <= 0 or math.isnan(ms):
        return None
    return nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------
# Machine information
# ---------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _proc_stat() -> tuple[int, int] | None:
    """(total, idle) jiffies over all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


def cpu_busy(interval: float = 0.25) -> float | None:
    """Fraction of all cores' time that was busy over ``interval`` seconds, or None (not Linux).

    Taken before a run: other processes competing for the cores make CPU figures meaningless (every
    OpenMP region of a multi-threaded step then waits for a descheduled thread), and on a small
    machine that is easy to miss."""
    a = _proc_stat()
    time.sleep(interval)
    b = _proc_stat()
    if a is None or b is None or b[0] <= a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


class _OtherLoad:
    """Share of all cores' time used by *other* processes between construction and ``fraction()``:
    busy time from /proc/stat minus this process's own CPU time."""

    def __init__(self):
        self.stat = _proc_stat()
        self.times = os.times()

    def fraction(self) -> float | None:
        stat, times = _proc_stat(), os.times()
        if self.stat is None or stat is None or stat[0] <= self.stat[0]:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total = (stat[0] - self.stat[0]) / tick
        busy = total - (stat[1] - self.stat[1]) / tick
        ours = (times.user - self.times.user) + (times.system - self.times.system)
        return min(1.0, max(0.0, (busy - ours) / total))


def _git(*args: str) -> str | None:
    # The repository this file lives in (an editable install), not the caller's cwd.
    try:
        out = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import onepass
        info["onepass"] = getattr(onepass, "__version__", None)
    except Exception as e:  # noqa: BLE001 - report, don't fail
        info["onepass"] = None
        info["onepass_error"] = _reason(e)
    commit = _git("rev-parse", "HEAD")
    info["git_commit"] = commit
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        info["git_dirty"] = bool(status) if status is not None else None
    info["peers"] = {d: _version(d) for d in ("torch-optimi", "bitsandbytes", "torchao", "triton")}
    return info


# ---------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------


DEFAULT_BUDGET_S = 10.0  # seconds of timed steps per contestant and case before it gets fewer rounds
DEFAULT_MIN_ROUNDS = 3


def run_benchmark(cases: Iterable[str] = DEFAULT_CASES, device: str | torch.device | None = None,
                  dtype: str | torch.dtype = "fp32", rounds: int | None = None, warmup: int = 2,
                  contestants: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  slow_limit: int | None = None, quick: bool = False,
                  progress: bool | None = None, lr: float = LR,
                  weight_decay: float = WEIGHT_DECAY, budget_s: float | None = DEFAULT_BUDGET_S,
                  min_rounds: int = DEFAULT_MIN_ROUNDS,
                  accuracy_steps: int = ACCURACY_STEPS) -> dict[str, Any]:
    """Run the named cases and return the full (JSON-serialisable) result.

    ``device`` defaults to cuda when available, else cpu. ``rounds`` (the most a contestant gets)
    defaults to 10 on CPU, 50 on CUDA (3 when ``quick``); ``budget_s`` and ``min_rounds`` give slow
    contestants fewer (``run_case``; ``budget_s=None``: everyone gets ``rounds``). ``contestants``
    defaults to every default contestant; ``exclude`` removes some (e.g. ``("torch-forloop",)``);
    ``slow_limit`` drops slow contestants only for cases with more params than that.
    ``accuracy_steps`` > 0 runs the accuracy protocol (``measure_accuracy``) for every available
    contestant first; 0 skips it. ``progress=None`` shows tqdm bars when stderr is a terminal."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch.cuda.is_available() is False")
    dtype = parse_dtype(dtype)
    if rounds is None:
        rounds = 3 if quick else (50 if device.type == "cuda" else 10)
    if rounds < 1 or min_rounds < 1:
        raise ValueError(f"rounds and min_rounds must be >= 1, got {rounds} and {min_rounds}")
    if budget_s is not None and budget_s <= 0:
        budget_s = None
    if quick:
        warmup = min(warmup, 1)
    cases = list(cases)
    for c in cases:
        if c not in CASES:
            raise ValueError(f"unknown case {c!r}; known cases: {', '.join(CASES)}")
    exclude = set(exclude)
    names = [n for n in (DEFAULT_CONTESTANTS if contestants is None else contestants) if n not in exclude]
    busy = cpu_busy()
    others = _OtherLoad()
    t0 = time.perf_counter()
    factories, skipped = available_contestants(device, names, dtype, lr, weight_decay, progress)
    probe_s = time.perf_counter() - t0

    acc: dict[str, dict[str, Any]] = {}
    acc_s = 0.0
    if accuracy_steps > 0 and factories:
        t0 = time.perf_counter()
        bar = progress_bar(len(factories), "accuracy", progress)
        try:
            acc = measure_accuracy(factories, device, lr=lr, weight_decay=weight_decay,
                                   steps=accuracy_steps, progress=bar)
        finally:
            bar.close()
        acc_s = time.perf_counter() - t0

    case_results = []
    for c in cases:
        t0 = time.perf_counter()
        res = run_case(c, case_shapes(c, device, quick), factories, device, dtype, rounds, warmup,
                       skipped=skipped, slow_limit=slow_limit, progress=progress,
                       budget_s=budget_s, min_rounds=min_rounds)
        res["elapsed_s"] = time.perf_counter() - t0
        for entry in res["contestants"]:
            if entry["name"] in acc:
                entry["accuracy"] = acc[entry["name"]]
        case_results.append(res)
    machine = machine_info(device)
    machine["cpu_busy_before"] = busy
    machine["cpu_others_during"] = others.fraction()
    return {
        "schema": 2,
        "machine": machine,
        "config": {"device": str(device), "dtype": _dtype_name(dtype), "rounds": rounds,
                   "min_rounds": min_rounds, "budget_s": budget_s,
                   "warmup": warmup, "quick": quick, "lr": lr, "weight_decay": weight_decay,
                   "slow_limit": slow_limit,
                   "contestants": {n: CONTESTANTS[n].description for n in names},
                   "reference": REFERENCE_CONTESTANT,
                   "accuracy": {"steps": accuracy_steps, "shapes": [list(s) for s in ACCURACY_SHAPES],
                                "decades": ACCURACY_DECADES, "zero_fraction": ACCURACY_ZERO_FRACTION,
                                "params": "fp32", "reference": "torch.optim.AdamW(foreach=False), fp32 state"}},
        "timing_s": {"probe": probe_s, "accuracy": acc_s},
        "accuracy": acc,
        "skipped": skipped,
        "cases": case_results,
    }


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _acc_cells(c: dict[str, Any]) -> list[str]:
    a = c.get("accuracy")
    if not a:
        return ["-", "-"]
    if "error" in a:
        return ["error", "error"]
    if not a.get("finite", True):
        return ["non-finite", "non-finite"]
    return [_fmt(a.get("max_abs"), ".1e"), _fmt(a.get("rel"), ".1e")]


def format_table(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Plain-text table: one row per case x contestant (speed, rounds, memory, accuracy), then the
    ceiling and notes (skips, errors, first steps that were not timed).

    Accepts the dict from ``run_benchmark`` or a list of case dicts (from ``run_case``)."""
    if isinstance(results, dict):
        cases = results.get("cases", [results] if "contestants" in results else [])
        header = _header(results)
    else:
        cases, header = list(results), []
    cols = ["case", "contestant", "ms/step", "n", "x torch-fused", "GB/s", "of ceiling",
            "state B/p", "max|Δ-ref|", "rel err"]
    rows: list[list[str]] = []
    notes: list[tuple[str, str]] = []  # (case, "name skipped: why" / "name ERROR: why")
    for case in cases:
        first_steps: list[str] = []
        for c in case["contestants"]:
            label = c["name"] + (f" [{c['backend']}]" if c.get("backend") else "")
            n = c.get("rounds", len(c.get("ms_all", [])) or None)
            rows.append([case["case"], label, _fmt(c["ms"], ".3f" if c["ms"] < 1000 else ".0f"),
                         str(n) if n else "-",
                         _fmt(c.get("x_torch_fused"), ".3f" if (c.get("x_torch_fused") or 1) < 0.1 else ".2f"),
                         _fmt(c.get("gbps"), ".1f"), _fmt(c.get("frac_ceiling"), ".2f"),
                         _fmt(c.get("state_bytes_per_param"), ".2f"), *_acc_cells(c)])
            warm = c.get("warmup_ms") or []
            if warm and getattr(CONTESTANTS.get(c["name"]), "compiles", False):
                first_steps.append(f"{c['name']} {warm[0] / 1e3:.1f} s")
            a = c.get("accuracy") or {}
            if "error" in a:
                notes.append((case["case"], f"{c['name']} accuracy ERROR: {a['error']}"))
        if first_steps:
            notes.append((case["case"], "first step, with torch.compile, not timed: "
                                        + ", ".join(first_steps)))
        ceil = case["ceiling"]
        rows.append([case["case"], f"(ceiling {ceil['kind']})", _fmt(ceil["ms"], ".3f"),
                     str(len(ceil.get("ms_all", []))) if ceil.get("ms_all") else "", "",
                     _fmt(ceil.get("gbps"), ".1f"), "1.00", "", "", ""])
        notes += [(case["case"], f"{n} skipped: {why}") for n, why in case.get("skipped", {}).items()]
        notes += [(case["case"], f"{n} ERROR: {why}") for n, why in case.get("errors", {}).items()]
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]

    def line(r):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(r, widths))).rstrip()

    out = header + [line(cols), line(["-" * w for w in widths])]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        out.append(line(r if r[0] != prev else [""] + r[1:]))
        prev = r[0]
    # A note seen in every case (a skip from the availability probe, an accuracy error) is said
    # once, without the case name.
    texts: list[str] = []
    for case_name, text in notes:
        everywhere = len(cases) > 1 and sum(t == text for _, t in notes) == len(cases)
        t = text if everywhere else f"{case_name}: {text}"
        if t not in texts:
            texts.append(t)
    if texts:
        out += [""] + texts
    if isinstance(results, dict) and results.get("timing_s"):
        t = results["timing_s"]
        parts = [f"probe {t.get('probe', 0):.0f} s", f"accuracy {t.get('accuracy', 0):.0f} s"]
        parts += [f"{c['case']} {c['elapsed_s']:.0f} s" for c in cases if c.get("elapsed_s") is not None]
        out += ["", "took: " + ", ".join(parts)]
    return "\n".join(out)


def _header(results: dict[str, Any]) -> list[str]:
    m, cfg = results.get("machine"), results.get("config")
    if not m or not cfg:
        return []
    commit = (m.get("git_commit") or "no commit")[:12] + ("+dirty" if m.get("git_dirty") else "")
    busy, others = m.get("cpu_busy_before"), m.get("cpu_others_during")
    busy_warning = []
    if (busy or 0) > BUSY_WARNING or (others or 0) > BUSY_WARNING:
        busy_warning = [f"WARNING: other processes used the CPU ({busy or 0:.0%} busy before the run, "
                        f"{others or 0:.0%} of all cores during it): the figures are not reliable"]
    peers = ", ".join(f"{d} {v}" for d, v in (m.get("peers") or {}).items() if v)
    budget = cfg.get("budget_s")
    rounds = (f"median of up to {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up steps"
              + (f"; n = rounds a contestant got (fewer when its steps would exceed {budget:g} s, "
                 f"at least {cfg.get('min_rounds', 1)})" if budget else ""))
    acc = cfg.get("accuracy") or {}
    lines = [
        f"onepass {m.get('onepass') or '(not importable)'} benchmark, {m['date']}, git {commit}",
        f"{cfg['device']}: {m['device_name']}, {m['threads']} threads, torch {m['torch']}, "
        f"{cfg['dtype']} params" + (" (quick)" if cfg.get("quick") else ""),
        rounds,
    ]
    if peers:
        lines.append(f"peers: {peers}")
    lines.append("GB/s = bytes an AdamW step must move / time; x torch-fused > 1 is faster than torch "
                 "fused; state B/p: measured bytes of optimizer state per param")
    if acc.get("steps"):
        lines.append(f"max|Δ-ref|, rel err: the update accumulated over {acc['steps']} steps against "
                     f"torch.optim.AdamW with fp32 state, same fp32 params and grads:")
        lines.append(f"  max abs difference and ‖Δ-ref‖/‖ref‖ (grad magnitudes spanning "
                     f"{acc.get('decades', ACCURACY_DECADES):g} decades in every block, "
                     f"{acc.get('zero_fraction', ACCURACY_ZERO_FRACTION):.0%} zeros each step)")
    return lines + busy_warning + [""]


def _family_color(name: str) -> str:
    for prefix, color in (("onepass", "tab:red"), ("torch-", "tab:blue"), ("optimi", "tab:purple"),
                          ("bitsandbytes", "tab:green"), ("torchao", "tab:orange")):
        if name.startswith(prefix):
            return color
    return "tab:gray"


def plot(results: dict[str, Any], path: str) -> None:
    """PNG with speed, memory and accuracy side by side. Top row, one panel per case: effective GB/s
    per contestant, the ceiling as a dashed line, bars labelled with the ratio to torch fused and
    the rounds timed. Bottom row: measured state bytes per param (first case) and the relative
    error of the accumulated update against torch.optim.AdamW fp32 (log scale). Needs matplotlib
    (imported here, not at load time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib, which is not installed "
                           "(pip install matplotlib)") from e
    cases = results["cases"]
    ncols = max(len(cases), 2)
    n_max = max([len(c["contestants"]) for c in cases] + [1])
    fig, axes = plt.subplots(2, ncols, figsize=(max(7.0, (0.45 * n_max + 1.6) * ncols), 9.0),
                             squeeze=False)
    for ax, case in zip(axes[0], cases):
        cs = case["contestants"]
        names = [c["name"] for c in cs]
        vals = [c["gbps"] or 0.0 for c in cs]
        bars = ax.bar(range(len(names)), vals, color=[_family_color(n) for n in names])
        for b, c in zip(bars, cs):
            x = c.get("x_torch_fused")
            label = (f"{x:.2f}x" if x is not None and x >= 0.1 else f"{x:.3f}x" if x is not None else "")
            label += f"\nn={c.get('rounds', len(c.get('ms_all', [])))}"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        cg = case["ceiling"].get("gbps")
        if cg:
            ax.axhline(cg, color="k", ls="--", lw=1,
                       label=f"ceiling ({case['ceiling']['kind']}) {cg:.0f} GB/s")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, 1.3 * max(vals + [cg or 0.0, 1e-9]))  # headroom for the legend and labels
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        n_t = case["n_tensors"]
        ax.set_title(f"speed, {case['case']}: {n_t} tensor{'s' if n_t != 1 else ''}, "
                     f"{case['n_params'] / 1e6:.1f}M params", fontsize=9)
        ax.set_ylabel("effective GB/s (label: x torch fused, rounds)")
    for ax in axes[0][len(cases):]:
        ax.axis("off")

    first = cases[0] if cases else {"contestants": [], "case": ""}
    cs = first["contestants"]
    names = [c["name"] for c in cs]
    ax = axes[1][0]
    vals = [c.get("state_bytes_per_param") or 0.0 for c in cs]
    bars = ax.bar(range(len(names)), vals, color=[_family_color(n) for n in names])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.15 * max(vals + [1e-9]))
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("optimizer state, bytes per param")
    ax.set_title(f"memory ({first['case']}): measured state bytes per param", fontsize=9)

    ax = axes[1][1]
    rel = []
    for c in cs:
        a = c.get("accuracy") or {}
        rel.append(a.get("rel") if a.get("finite", True) and "error" not in a else float("inf"))
    finite = [r for r in rel if r is not None and math.isfinite(r) and r > 0]
    lo = min(finite + [1e-8]) / 3
    hi = max(finite + [10.0]) * 30
    heights = [hi / 3 if r is None or not math.isfinite(r) else max(r, lo) for r in rel]
    bars = ax.bar(range(len(names)), heights, bottom=0, color=[_family_color(n) for n in names])
    for b, r in zip(bars, rel):
        text = ("-" if r is None else "fail" if not math.isfinite(r) else "0" if r == 0
                else f"{r:.1e}")
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.axhline(1.0, color="k", ls=":", lw=1, label="error as large as the update")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    acc_cfg = (results.get("config") or {}).get("accuracy") or {}
    ax.set_ylabel("‖Δ - Δ_ref‖ / ‖Δ_ref‖")
    ax.set_title(f"accuracy after {acc_cfg.get('steps', ACCURACY_STEPS)} steps vs torch AdamW fp32",
                 fontsize=9)
    for ax in axes[1][2:]:
        ax.axis("off")

    m = results.get("machine", {})
    fig.suptitle(f"AdamW step on {m.get('device_name', '')}, "
                 f"{results.get('config', {}).get('dtype', '')} params, torch {m.get('torch', '')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
