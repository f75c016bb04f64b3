"""The cuda backend's kernels on the CPU, for tests: csrc/cuda/ compiled by g++ against the SIMT
emulation of csrc/emu/ (ARCHITECTURE.md section 7) and run on CPU tensors, through the same host
step (checks, plan, choice of instantiation) as the real launch.

Never chosen by ``backend="auto"`` and not a user choice: the test suite builds the module
(``build``, ~2 min on 2 cores, cached by torch under TORCH_EXTENSIONS_DIR) and registers the
backends with ``enable``. Two of them: ``cuda-emu`` keeps the step counts on the host, as the cuda
backend does for ``capturable=False``; ``cuda-emu-capturable`` treats them as device counts (the
kernels read them, ``bump_device_steps`` advances them), the path of ``capturable=True`` and CUDA
graphs.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from .base import Backend, Batch, SkippedCounts, defers_found_inf, plan_step_kwargs

_modules: Dict[int, object] = {}

# Optimization level of the emulated build: the kernels run on a few thousand elements in tests,
# so compile time matters more than speed (-O1 builds in about half the time of -O3).
# ONEPASS_EMU_OPT overrides it: bench/host_time.py times the host step built as the real module is
# (-O3; a module of its own name, so the tests' -O1 build stays cached).
EMU_OPT = "-O1"


def _opt() -> str:
    return os.environ.get("ONEPASS_EMU_OPT", EMU_OPT)


def build(planted_bug: int = 0, verbose: bool = False):
    """The emulation module (built on first use; ``planted_bug`` 1-4 builds the kernels with one
    of the bugs of tests/emu/test_planted_bugs.py planted)."""
    if planted_bug in _modules:
        return _modules[planted_bug]
    from torch.utils import cpp_extension

    from .. import _build

    root = _build.csrc_dir()
    if root is None:
        raise RuntimeError("onepass: the emulated cuda backend needs the csrc/ sources beside this "
                           "install (pip install -e .) or ONEPASS_CSRC")
    flags = [f for f in _build.CXX_FLAGS if not f.startswith("-O")] + [
        _opt(), "-Wno-unknown-pragmas", f"-DONEPASS_PLANTED_BUG={int(planted_bug)}"]
    names = ["emu/adam_emu.cpp", "emu/emu_fp32.cpp", "emu/emu_lowp.cpp", "emu/simt.cpp",
             "batch_checks.cpp"]
    module = cpp_extension.load(
        name=f"onepass_cuda_emu_bug{int(planted_bug)}"
             + ("" if _opt() == EMU_OPT else "_" + _opt().lstrip("-")),
        sources=_build.sources(names, root),
        extra_include_paths=[root],
        extra_cflags=flags,
        verbose=verbose,
    )
    _modules[planted_bug] = module
    return module


class CudaEmuBackend(Backend):
    """The cuda backend's kernels under the SIMT emulation, on CPU tensors."""

    checks_before_writing = True
    takes_plan = True
    state_formats = ("fp32", "bf16", "int8")
    param_roundings = ("nearest", "stochastic", "kahan")

    def __init__(self, name: str = "cuda-emu", device_steps: bool = False, planted_bug: int = 0):
        self.name = name
        self.device_steps = device_steps
        self.planted_bug = planted_bug
        #: Set by tests: the host step behaves as during CUDA graph capture.
        self.capturing = False
        #: Set by bench/host_time.py: the host step runs without the kernels (timing only:
        #: nothing is updated but the step counts).
        self.stub_launch = False

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cpu":
            return f"the emulated cuda backend runs CPU tensors only, not {device.type}"
        if self.planted_bug not in _modules:
            return "not built (onepass.backends.cuda_emu.enable() builds it)"
        return None

    def validate(self, batch: Batch) -> None:
        self._call(batch, check_only=True)

    def step(self, batch: Batch) -> None:
        self._call(batch, check_only=False)

    def _call(self, batch: Batch, check_only: bool) -> None:
        if batch.plan is not None:  # the optimizer's cached plan: the tensors are in C++
            plan, part = batch.plan
            defer = not self.device_steps and defers_found_inf(batch)
            _modules[self.planted_bug].step_plan(
                plan.address(), part, device_steps=self.device_steps, capturing=self.capturing,
                check_only=check_only, stub_launch=self.stub_launch, defer_found_inf=defer,
                **plan_step_kwargs(batch))
            if defer and not check_only:  # as the cuda backend's
                batch.deferred.append(SkippedCounts(batch.found_inf, batch.steps))
            return
        lr = batch.lr
        lr_tensor = lr if isinstance(lr, torch.Tensor) else None
        if self.stub_launch:
            raise RuntimeError("onepass: stub_launch needs the optimizer's plan (Batch.plan)")
        _modules[self.planted_bug].step(
            batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs,
            batch.steps, lr=0.0 if lr_tensor is not None else float(lr), lr_tensor=lr_tensor,
            beta1=batch.beta1, beta2=batch.beta2, eps=batch.eps, weight_decay=batch.weight_decay,
            amsgrad=batch.amsgrad, maximize=batch.maximize, decoupled=batch.decoupled,
            grad_scale=batch.grad_scale, found_inf=batch.found_inf,
            state_format=batch.state_format, exp_avg_absmaxs=batch.exp_avg_absmaxs,
            exp_avg_sq_absmaxs=batch.exp_avg_sq_absmaxs, qtables=batch.qtables,
            param_rounding=batch.param_rounding, kahan_comps=batch.kahan_comps,
            seed=int(batch.seed), device_steps=self.device_steps, capturing=self.capturing,
            check_only=check_only,
        )


def enable(planted_bug: int = 0) -> Dict[str, CudaEmuBackend]:
    """Builds the module and registers its backends by name (``backend="cuda-emu"`` ...); auto
    never takes them. Returns them by name."""
    from . import BACKENDS

    build(planted_bug, verbose=os.environ.get("ONEPASS_EMU_VERBOSE") == "1")
    suffix = f"-bug{planted_bug}" if planted_bug else ""
    made = {}
    for name, device_steps in ((f"cuda-emu{suffix}", False), (f"cuda-emu-capturable{suffix}", True)):
        backend = CudaEmuBackend(name, device_steps, planted_bug)
        BACKENDS[name] = backend
        made[name] = backend
    return made


def disable(names) -> None:
    from . import BACKENDS

    for name in names:
        BACKENDS.pop(name, None)
