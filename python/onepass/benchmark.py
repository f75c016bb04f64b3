"""Optimizer-step benchmark: onepass.AdamW against torch's AdamW variants and optional peers.

This module is the one definition of the benchmark cases, contestants and byte accounting
(ARCHITECTURE.md section 5). ``python -m onepass`` and the pytest-benchmark files under ``bench/``
both use it, so a case means the same thing everywhere.

It imports only the standard library and torch at module level. ``onepass.AdamW`` and every peer
(optimi, bitsandbytes, torchao, matplotlib) are imported lazily inside the function that needs them,
and a contestant that cannot be imported or cannot take a step is *skipped with a reason*, never an
error: the benchmark must run on a machine that has none of the peers, and while the optimizer itself
is still being written.

What is measured
----------------
* Every contestant steps the **same** parameter and gradient tensors (each optimizer keeps its own
  state), so all of them see identical shapes, dtypes, alignment and memory placement, and the
  parameters are only allocated once (gpt2 is 0.5 GB of params plus 0.5 GB of grads in fp32; every
  optimizer adds ~1 GB of state).
* After a warm-up (which also creates the lazily allocated state), the contestants and the
  bandwidth ceiling take turns: one step each per round, in an order rotated every round, so clock,
  thermal and neighbour drift hit all of them alike. The figure reported is the median over rounds.
* Effective bandwidth = bytes an AdamW step must move / time. For each parameter element: read
  param, grad and the state, write param and state. With fp32 params and fp32 state that is
  4 + 4 + 8 (read) + 4 + 8 (write) = 28 bytes. The state bytes are measured from each optimizer's own
  state after warm-up, so a contestant with a different state format is charged for its own bytes.
* The ceiling is measured in the same run: on CPU an in-place ``x.mul_(c)`` on a float32 buffer four
  times the case's element count (read + write, large enough to leave the caches, like the step's
  four streams), on GPU a device-to-device ``dst.copy_(src)``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "LR",
    "WEIGHT_DECAY",
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
    "bytes_moved",
    "machine_info",
    "cpu_busy",
    "run_case",
    "run_benchmark",
    "derive",
    "format_table",
    "plot",
    "Progress",
    "Timer",
]

Shape = tuple[int, ...]
Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

# Hyperparameters every contestant gets. The values do not change the work a step does, but lr must be
# small enough that hundreds of steps on fixed gradients leave the parameters in a normal range.
LR = 1e-4
WEIGHT_DECAY = 1e-2

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
    out of large cases by the caller (``slow_limit``)."""

    name: str
    build: Callable[[list[torch.Tensor], float, float], torch.optim.Optimizer]
    description: str
    slow: bool = False
    cuda_only: bool = False
    default: bool = True


def _onepass(backend: str, **extra):
    def build(params, lr, weight_decay):
        # Imported here, not at module level: the benchmark must run (and report onepass as skipped)
        # while the optimizer is missing or broken, and `import onepass.benchmark` must stay cheap.
        try:
            import onepass
            cls = onepass.AdamW
        except Exception as e:  # ImportError, AttributeError, or whatever a half-written package raises
            raise ImportError(f"onepass.AdamW not importable ({type(e).__name__}: {e})") from e
        return cls(params, lr=lr, weight_decay=weight_decay, backend=backend, **extra)
    return build


def _torch(**kw):
    def build(params, lr, weight_decay):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    return build


def _optimi(params, lr, weight_decay):
    import optimi  # torch-optimi
    return optimi.AdamW(params, lr=lr, weight_decay=weight_decay)


def _bitsandbytes(params, lr, weight_decay):
    import bitsandbytes as bnb
    return bnb.optim.AdamW(params, lr=lr, weight_decay=weight_decay, optim_bits=32)


def _bitsandbytes_8bit(params, lr, weight_decay):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def _torchao(params, lr, weight_decay):
    # torchao's full-precision AdamW (torch.compile'd); its low-bit variants use tensor-subclass state
    # whose bytes this benchmark would not account correctly. Older releases keep it in prototype.
    try:
        from torchao.optim import _AdamW
    except ImportError:
        from torchao.prototype.low_bit_optim import _AdamW
    return _AdamW(params, lr=lr, weight_decay=weight_decay)


CONTESTANTS: dict[str, Contestant] = {
    c.name: c
    for c in [
        Contestant("onepass", _onepass("auto"), 'onepass.AdamW(backend="auto")'),
        Contestant("torch-fused", _torch(fused=True), "torch.optim.AdamW(fused=True)"),
        Contestant("torch-foreach", _torch(foreach=True), "torch.optim.AdamW(foreach=True)"),
        Contestant("torch-forloop", _torch(foreach=False), "torch.optim.AdamW(foreach=False)",
                   slow=True),
        Contestant("optimi", _optimi, "optimi.AdamW (torch-optimi)"),
        Contestant("bitsandbytes", _bitsandbytes, "bitsandbytes.optim.AdamW(optim_bits=32)"),
        Contestant("torchao", _torchao, "torchao.optim._AdamW", cuda_only=True),
        # Low-precision state: bf16 moments (4 B/param) and blockwise 8-bit moments (~2.03 B/param).
        Contestant("onepass-bf16", _onepass("auto", state_dtype="bf16"),
                   'onepass.AdamW(state_dtype="bf16")'),
        Contestant("onepass-int8", _onepass("auto", state_dtype="int8"),
                   'onepass.AdamW(state_dtype="int8")'),
        # The fused statistics (‖w‖, ‖Δw‖ per param inside the pass): their cost next to "onepass".
        Contestant("onepass-stats", _onepass("auto", statistics=True),
                   'onepass.AdamW(statistics=True)', default=False),
        Contestant("bitsandbytes-8bit", _bitsandbytes_8bit, "bitsandbytes.optim.AdamW8bit",
                   slow=True, default=False),
        # Not run by default: a named backend, to compare onepass's own backends side by side.
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
                          weight_decay: float = WEIGHT_DECAY) -> tuple[dict[str, Factory], dict[str, str]]:
    """Probe contestants on ``device``/``dtype``: ``(factories, skipped)``.

    A contestant is available when it builds and takes two steps on a tiny parameter; otherwise it
    goes into ``skipped`` with the reason (not installed, no GPU, unsupported dtype, ...). Unknown
    names are a caller error (ValueError)."""
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    names = list(DEFAULT_CONTESTANTS if names is None else names)
    for n in names:
        if n not in CONTESTANTS:
            raise ValueError(f"unknown contestant {n!r}; known: {', '.join(CONTESTANTS)}")
    factories: dict[str, Factory] = {}
    skipped: dict[str, str] = {}
    for n in names:
        c = CONTESTANTS[n]
        if c.cuda_only and device.type != "cuda":
            skipped[n] = "CUDA only"
            continue
        factory = make_factory(n, lr, weight_decay)
        try:
            probe = make_params([(67,), (3, 5)], device, dtype, seed=1)
            opt = factory(probe)
            opt.step()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - any failure of a peer means "skip it", never "fail"
            skipped[n] = _reason(e)
            continue
        factories[n] = factory
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


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of per-element optimizer state (all tensors in ``optimizer.state`` except the 0-dim
    ones such as ``step``; each tensor object counted once, so shared buffers are not double counted)."""
    seen: set[int] = set()
    total = 0
    for st in optimizer.state.values():
        if not isinstance(st, dict):
            continue
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
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


class Progress:
    """``\\r[#####     ] case contestant i/n`` on stderr; silent when disabled or not a tty."""

    def __init__(self, enabled: bool | None = None, stream=None, width: int = 30):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = isatty if enabled is None else (enabled and isatty)
        self.width = width
        self._last = 0

    def update(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        filled = int(self.width * done / max(total, 1))
        line = f"\r[{'#' * filled}{' ' * (self.width - filled)}] {label} {done}/{total}"
        pad = max(0, self._last - len(line))
        self.stream.write(line + " " * pad)
        self.stream.flush()
        self._last = len(line)

    def clear(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\r" + " " * self._last + "\r")
            self.stream.flush()
            self._last = 0


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
             slow_limit: int | None = None, progress: Progress | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Time one case. Returns a JSON-serialisable dict (see ``derive`` for the derived fields).

    ``factories`` maps contestant name -> factory(params); all share one set of params/grads.
    Contestants flagged slow are skipped when the case has more than ``slow_limit`` params.
    A contestant that raises during the run (e.g. out of memory) is dropped and listed in ``errors``
    instead of aborting the whole benchmark."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    progress = progress or Progress(enabled=False)
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
    ceil_times: list[float] = []

    total = len(names) * (warmup + rounds) + rounds
    done = 0

    def fail(n: str, e: BaseException) -> None:
        # Called inside the except block; the memory (e.g. after an OOM) is released by _free once
        # the exception and its traceback are gone.
        errors[n] = _reason(e)
        opts.pop(n, None)
        times.pop(n, None)

    try:
        # Warm-up: builds each optimizer and its state (the first step allocates and page-faults it).
        for n in names:
            try:
                opts[n] = factories[n](params)
                for _ in range(warmup):
                    opts[n].step()
                    done += 1
                    progress.update(done, total, f"{name} {n} (warm-up)")
                _sync(device)
            except Exception as e:  # noqa: BLE001 - drop this contestant, keep the others
                fail(n, e)
            if n in errors:
                _free(device)
        for _ in range(max(1, warmup)):
            ceiling.fn()
        _sync(device)

        # Rounds: every contestant and the ceiling once per round, rotating the order.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one contestant's timing would be noise charged to it
        try:
            for r in range(rounds):
                order = ["<ceiling>"] + list(opts)
                k = r % len(order)
                for n in order[k:] + order[:k]:
                    if n == "<ceiling>":
                        ceil_times.append(timer(ceiling.fn))
                        label = f"{name} ceiling"
                    elif n in opts:
                        try:
                            times[n].append(timer(opts[n].step))
                        except Exception as e:  # noqa: BLE001
                            fail(n, e)
                        if n in errors:
                            _free(device)
                        label = f"{name} {n}"
                    else:
                        continue
                    done += 1
                    progress.update(done, total, label)
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
            "warmup": warmup,
            "ceiling": {"kind": ceiling.kind, "bytes": ceiling.bytes, "ms": ceiling_ms,
                        "ms_all": ceil_times},
            "contestants": contestants,
            "skipped": skipped,
            "errors": errors,
        }
    finally:
        progress.clear()
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


def run_benchmark(cases: Iterable[str] = DEFAULT_CASES, device: str | torch.device | None = None,
                  dtype: str | torch.dtype = "fp32", rounds: int | None = None, warmup: int = 2,
                  contestants: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  slow_limit: int | None = None, quick: bool = False,
                  progress: bool | None = None, lr: float = LR,
                  weight_decay: float = WEIGHT_DECAY) -> dict[str, Any]:
    """Run the named cases and return the full (JSON-serialisable) result.

    ``device`` defaults to cuda when available, else cpu. ``rounds`` defaults to 10 on CPU, 50 on
    CUDA (3 when ``quick``). ``contestants`` defaults to every default contestant; ``exclude`` removes
    some (e.g. ``("torch-forloop",)``); ``slow_limit`` drops slow contestants only for cases with more
    params than that. ``progress=None`` shows the bar when stderr is a tty."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch.cuda.is_available() is False")
    dtype = parse_dtype(dtype)
    if rounds is None:
        rounds = 3 if quick else (50 if device.type == "cuda" else 10)
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
    factories, skipped = available_contestants(device, names, dtype, lr, weight_decay)

    bar = Progress(enabled=progress)
    case_results = [
        run_case(c, case_shapes(c, device, quick), factories, device, dtype, rounds, warmup,
                 skipped=skipped, slow_limit=slow_limit, progress=bar)
        for c in cases
    ]
    machine = machine_info(device)
    machine["cpu_busy_before"] = busy
    machine["cpu_others_during"] = others.fraction()
    return {
        "schema": 1,
        "machine": machine,
        "config": {"device": str(device), "dtype": _dtype_name(dtype), "rounds": rounds,
                   "warmup": warmup, "quick": quick, "lr": lr, "weight_decay": weight_decay,
                   "slow_limit": slow_limit,
                   "contestants": {n: CONTESTANTS[n].description for n in names},
                   "reference": REFERENCE_CONTESTANT},
        "cases": case_results,
    }


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Plain-text table: one row per case x contestant, then the ceiling and any skips/errors.

    Accepts the dict from ``run_benchmark`` or a list of case dicts (from ``run_case``)."""
    if isinstance(results, dict):
        cases = results.get("cases", [results] if "contestants" in results else [])
        header = _header(results)
    else:
        cases, header = list(results), []
    cols = ["case", "contestant", "ms/step", "GB/s", "B/param", "state B/p", "of ceiling",
            "x torch-fused"]
    rows: list[list[str]] = []
    notes: list[tuple[str, str]] = []  # (case, "name skipped: why" / "name ERROR: why")
    for case in cases:
        for c in case["contestants"]:
            label = c["name"] + (f" [{c['backend']}]" if c.get("backend") else "")
            rows.append([case["case"], label, _fmt(c["ms"], ".3f"), _fmt(c.get("gbps"), ".1f"),
                         _fmt(c.get("bytes_per_param"), ".1f"),
                         _fmt(c.get("state_bytes_per_param"), ".2f"),
                         _fmt(c.get("frac_ceiling"), ".2f"), _fmt(c.get("x_torch_fused"), ".2f")])
        ceil = case["ceiling"]
        rows.append([case["case"], f"(ceiling {ceil['kind']})", _fmt(ceil["ms"], ".3f"),
                     _fmt(ceil.get("gbps"), ".1f"), "", "", "1.00", ""])
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
    # A skip from the availability probe repeats in every case: say it once, without the case name.
    texts: list[str] = []
    for case_name, text in notes:
        everywhere = len(cases) > 1 and sum(t == text for _, t in notes) == len(cases)
        t = text if everywhere else f"{case_name}: {text}"
        if t not in texts:
            texts.append(t)
    if texts:
        out += [""] + texts
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
    return [
        f"onepass {m.get('onepass') or '(not importable)'} benchmark, {m['date']}, git {commit}",
        f"{cfg['device']}: {m['device_name']}, {m['threads']} threads, torch {m['torch']}, "
        f"{cfg['dtype']}, median of {cfg['rounds']} rounds after {cfg['warmup']} warm-up steps"
        + (" (quick)" if cfg.get("quick") else ""),
        "GB/s = bytes an AdamW step must move / time; x torch-fused > 1 is faster than torch fused",
        *busy_warning,
        "",
    ]


def plot(results: dict[str, Any], path: str) -> None:
    """Bar chart (PNG): effective GB/s per contestant, one panel per case, ceiling as a dashed line,
    bars labelled with the ratio to torch fused. Needs matplotlib (imported here, not at load time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib, which is not installed "
                           "(pip install matplotlib)") from e
    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(max(7.0, 4.5 * len(cases) + 1), 4.6),
                             squeeze=False)
    for ax, case in zip(axes[0], cases):
        names = [c["name"] + (f"\n[{c['backend']}]" if c.get("backend") else "")
                 for c in case["contestants"]]
        vals = [c["gbps"] or 0.0 for c in case["contestants"]]
        colors = ["tab:red" if n.startswith("onepass") else "tab:blue" for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        for b, c in zip(bars, case["contestants"]):
            if c.get("x_torch_fused") is not None:
                ax.annotate(f"{c['x_torch_fused']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
        cg = case["ceiling"].get("gbps")
        if cg:
            ax.axhline(cg, color="k", ls="--", lw=1,
                       label=f"ceiling ({case['ceiling']['kind']}) {cg:.0f} GB/s")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, 1.2 * max(vals + [cg or 0.0, 1e-9]))  # headroom for the legend and labels
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        n_t = case["n_tensors"]
        ax.set_title(f"{case['case']}: {n_t} tensor{'s' if n_t != 1 else ''}, "
                     f"{case['n_params'] / 1e6:.1f}M params", fontsize=9)
        ax.set_ylabel("effective GB/s")
    m = results.get("machine", {})
    fig.suptitle(f"AdamW step on {m.get('device_name', '')}, {results.get('config', {}).get('dtype', '')}, "
                 f"torch {m.get('torch', '')}\nbar labels: speed relative to torch fused", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
