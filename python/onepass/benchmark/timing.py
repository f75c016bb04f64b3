"""Timing: one call timed, the bandwidth ceiling, the rounds each contestant takes part in, and
the progress bar."""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
