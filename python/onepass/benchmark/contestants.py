"""The contestants: onepass, torch.optim.AdamW variants and the peers, each made by a factory
that is skipped with a reason when its peer cannot be imported or cannot step here."""
from __future__ import annotations

import contextlib

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .cases import (ACCURACY_SHAPES, BETAS, EPS, LR, WEIGHT_DECAY, Factory, make_params,
                    parse_dtype)
from .timing import progress_bar


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
