"""The benchmark cases (parameter shapes), the hyperparameters every contestant gets, and the
parameter tensors they step."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

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


# ---- the accuracy protocol's problem (accuracy.py) ----
# A (64, 1024) weight (65,536 elements: every blockwise format quantizes it, 256 blocks of 256,
# 512 of 128), a bias-like vector and an odd-shaped tensor (kept in fp32 by the 8/4-bit formats).
ACCURACY_SHAPES: list[Shape] = [(64, 1024), (1024,), (3, 5)]
ACCURACY_STEPS = 100
# Gradient magnitudes within a block span this many decades (log-uniform per element; the first
# layer of a ReLU MLP showed max/5th-percentile ratios of 1.7e2 to 5.2e3 per 256-element block) ...
ACCURACY_DECADES = 4.0
# ... and this fraction of the elements gets an exact zero at each step.
ACCURACY_ZERO_FRACTION = 0.25
