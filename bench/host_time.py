"""A step's host time with negligible kernel work (issue 16's measure): 148 and 2000 params of 16
elements each, so what is timed is the per-step and per-tensor work around the kernels.

Runs, interleaved round by round in one process (so machine noise hits every contender alike),
and reports medians in microseconds:
  noop          a torch.optim.Optimizer whose step does nothing (the floor any optimizer pays)
  onepass-cpu   onepass.AdamW, cpu backend (fp32 / bf16 / int8 state; 16-element tensors keep
                fp32 state under int8, so that row is the int8 group's host path)
  set_to_none   the same, with new grad tensors every step (zero_grad(set_to_none=True))
  cuda-host     the cuda backend's host step (checks, plan, tables, scalars) with the kernel
                launches stubbed out: the emulated module's ``stub_launch``, with
                ONEPASS_HOST_TIME_EMU=1 (it builds the emulation module at -O3, as the real
                module's host code is: ~4 min the first time)
  triton-host   the triton backend's host step with the launches stubbed (skipped without triton;
                nothing is updated, only the counts advance)
  torch-fused   torch.optim.AdamW(fused=True)

    python bench/host_time.py [--rounds 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import onepass

SIZES = (148, 2000)
NUMEL = 16


def _params(n: int, dtype=torch.float32) -> List[torch.Tensor]:
    out = []
    for _ in range(n):
        p = torch.zeros(NUMEL, dtype=dtype, requires_grad=True)
        p.grad = torch.randn(NUMEL).to(dtype)
        out.append(p)
    return out


class _Noop(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        return None


def contenders(n: int) -> Dict[str, Callable[[], None]]:
    out: Dict[str, Callable[[], None]] = {}
    ps = _params(n)
    out["noop"] = _Noop(ps).step
    for fmt in ("fp32", "bf16", "int8"):
        out[f"onepass-cpu {fmt}"] = onepass.AdamW(_params(n), lr=1e-3, backend="cpu",
                                                  state_dtype=fmt).step
    ps_none = _params(n)
    opt_none = onepass.AdamW(ps_none, lr=1e-3, backend="cpu")
    fresh = [torch.randn(NUMEL) for _ in range(n)]

    def set_to_none():
        # new grad tensors each step, as after zero_grad(set_to_none=True) and a backward; the
        # assignment is outside the timed call (see _time)
        opt_none.step()

    def new_grads():
        for p, g in zip(ps_none, fresh):
            p.grad = g.clone()

    set_to_none.before = new_grads  # type: ignore[attr-defined]
    out["onepass-cpu fp32 set_to_none"] = set_to_none
    emu = _emu_stub()
    if emu is not None:
        out["cuda-host fp32 (launch stubbed)"] = onepass.AdamW(
            _params(n), lr=1e-3, backend=emu).step
    if _triton_stub():
        out["triton-host fp32 (launch stubbed)"] = onepass.AdamW(
            _params(n), lr=1e-3, backend="triton").step
    out["torch-fused"] = torch.optim.AdamW(_params(n), lr=1e-3, fused=True).step
    return out


def _emu_stub():
    """The emulated cuda backend with its launches stubbed, when the test suite built it."""
    try:
        from onepass.backends import cuda_emu
    except ImportError:
        return None
    if os.environ.get("ONEPASS_HOST_TIME_EMU") != "1":
        return None
    # the host step compiled as the real module's is (-O3), not as the tests' emulation (-O1)
    os.environ.setdefault("ONEPASS_EMU_OPT", "-O3")
    backends = cuda_emu.enable()
    backend = backends["cuda-emu"]
    backend.stub_launch = True
    return "cuda-emu"


class _NoLaunch:
    """Stands for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _triton_stub() -> bool:
    """The triton backend on CPU tensors with every kernel a no-op: what remains of its step is
    the host path (tables, counts, the packed upload). False without triton."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    os.environ["TRITON_INTERPRET"] = "1"  # (the backend takes CPU tensors only then)
    from onepass.backends import triton as tb

    _STUBBED.append(tb._kernels)  # (run() puts the real kernels back)
    tb._kernels = type("StubKernels", (), {"adam_kernel": _NoLaunch(),
                                           "adam_int8_kernel": _NoLaunch()})()
    return True


_STUBBED: list = []


def _unstub() -> None:
    from onepass.backends import triton as tb

    if _STUBBED:
        tb._kernels = _STUBBED[0]
        _STUBBED.clear()


def _time(fn: Callable[[], None], reps: int) -> List[float]:
    before = getattr(fn, "before", None)
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(rounds: int = 30, reps: int = 20, sizes=SIZES) -> Dict[str, Dict[str, float]]:
    torch.manual_seed(0)
    result: Dict[str, Dict[str, float]] = {}
    try:
        for n in sizes:
            cs = contenders(n)
            for fn in cs.values():  # warm up: state made, plans cached
                _time(fn, 3)
            samples: Dict[str, List[float]] = {k: [] for k in cs}
            for _ in range(rounds):
                for name, fn in cs.items():
                    samples[name] += _time(fn, reps)
            result[str(n)] = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    finally:
        _unstub()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(args.rounds)
    names = list(next(iter(res.values())))
    print(f"{'contender':36s}" + "".join(f"{n + ' tensors':>16s}" for n in res))
    for name in names:
        print(f"{name:36s}" + "".join(f"{res[n][name]:13.1f} us" for n in res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "python": platform.python_version(),
                       "machine": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "median_us": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
