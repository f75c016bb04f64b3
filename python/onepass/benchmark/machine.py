"""What the results record about the machine: CPU model, load from other processes, versions."""
from __future__ import annotations

import datetime as _dt

import importlib.metadata
import os
import platform
import subprocess
import time
from typing import Any

import torch

from .contestants import _reason


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
