"""Loads the compiled extension (onepass._C) and registers the fake implementations of its ops.

Importing onepass never fails because of the extension: when it is missing or cannot be loaded,
``EXT_ERROR`` says why, onepass warns once, and the "auto" backend uses the reference.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Optional

import torch

EXT_ERROR: Optional[str] = None
_C = None

def _spec_missing() -> bool:
    try:
        return importlib.util.find_spec("onepass._C") is None
    except (ImportError, ValueError):  # e.g. sys.modules["onepass._C"] = None
        return False


if _spec_missing():
    EXT_ERROR = "not built (no onepass/_C*.so beside the package)"
else:
    try:
        from onepass import _C  # noqa: F401,F811  (importing registers torch.ops.onepass.*)
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (ABI mismatch), ...
        EXT_ERROR = f"{type(exc).__name__}: {exc}"

if EXT_ERROR is not None:
    warnings.warn(
        "onepass: the compiled CPU kernels could not be loaded "
        f"({EXT_ERROR}); onepass runs on the reference backend. Rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXT = EXT_ERROR is None


def _register_fakes() -> None:
    @torch.library.register_fake("onepass::adam_step_")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr,
                        lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                        grad_scale, found_inf) -> None:
        # In-place update of its inputs: nothing new to describe for tracing.
        return None

    @torch.library.register_fake("onepass::adam_step_lowp_")
    def _adam_step_lowp_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr,
                             lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                             decoupled, grad_scale, found_inf, state_format, exp_avg_absmaxs,
                             exp_avg_sq_absmaxs, qtables, param_rounding, kahan_comps,
                             seed) -> None:
        return None

    @torch.library.register_fake("onepass::adam_step_stats_")
    def _adam_step_stats_fake(*args, **kwargs) -> None:
        return None  # in place, stats included

    # The checks (CpuBackend.validate when traced, a step with several batches): without fakes
    # torch.compile cannot put them in a graph and breaks the graph at every such step.
    @torch.library.register_fake("onepass::adam_check")
    def _adam_check_fake(*args, **kwargs) -> None:
        return None

    @torch.library.register_fake("onepass::adam_check_lowp")
    def _adam_check_lowp_fake(*args, **kwargs) -> None:
        return None

    # A check returns nothing and writes nothing, so a compiled graph would drop it as dead
    # code, and a step over several batches could then write one before the next one fails.
    from torch.fx.node import has_side_effect

    has_side_effect(torch.ops.onepass.adam_check.default)
    has_side_effect(torch.ops.onepass.adam_check_lowp.default)


if HAS_EXT:
    _register_fakes()


# ---------------------------------------------------------------------------------------------
# The CUDA kernels: in onepass._C when it was built with nvcc, else compiled on first use of the
# cuda backend (torch.utils.cpp_extension.load; minutes, once per torch version: torch caches
# the build under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
# ---------------------------------------------------------------------------------------------

_cuda_module = None
_cuda_jit_error: Optional[str] = None


def has_prebuilt_cuda() -> bool:
    return HAS_EXT and hasattr(_C, "adam_step_cuda")


def cuda_jit_unavailable_reason() -> Optional[str]:
    """Why the CUDA kernels cannot be JIT-built here (None when they can be tried)."""
    from torch.utils import cpp_extension

    from . import _build

    if os.environ.get("ONEPASS_JIT") == "0":
        return "the JIT build is disabled (ONEPASS_JIT=0)"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a build without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit (nvcc) was not found: install it or set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if _build.csrc_dir() is None:
        return ("the C++/CUDA sources are not beside this install: install onepass from a "
                "source checkout (pip install -e .) or set ONEPASS_CSRC to its csrc/ folder")
    return None


def build_cuda_jit(addon: Optional[bool] = None, verbose: bool = False):
    """Compiles and loads the CUDA kernels with torch.utils.cpp_extension.load.

    ``addon`` (default: when onepass._C is loaded): only the CUDA kernels, their checks and
    bindings, beside the CPU-only onepass._C that already defines the ops' schema; otherwise the
    whole extension (schema, CPU and CUDA kernels). Same flags as setup.py (_build.py)."""
    from torch.utils import cpp_extension

    from . import _build

    addon = HAS_EXT if addon is None else addon
    root = _build.csrc_dir()
    if root is None:
        raise RuntimeError(cuda_jit_unavailable_reason() or "onepass: csrc/ not found")
    names = _build.ADDON_SOURCES if addon else _build.CPU_SOURCES + _build.CUDA_SOURCES
    macros = ["-DONEPASS_WITH_CUDA"] + (["-DONEPASS_CUDA_ADDON"] if addon else [])
    return cpp_extension.load(
        name="onepass_cuda_addon" if addon else "onepass_cuda_full",
        sources=_build.sources(names, root),
        extra_include_paths=[root],
        extra_cflags=_build.CXX_FLAGS + macros,
        extra_cuda_cflags=_build.NVCC_FLAGS + macros,
        verbose=verbose,
    )


def cuda_module(build: bool = True):
    """The module whose ``adam_step_cuda`` runs the CUDA kernels: onepass._C when built with them,
    else the JIT build (made on the first call with ``build=True``; a failure is remembered and
    raised again, so a step does not retry a build of minutes). None when ``build=False`` and
    nothing is built yet."""
    global _cuda_module, _cuda_jit_error
    if has_prebuilt_cuda():
        return _C
    if _cuda_module is not None:
        return _cuda_module
    if _cuda_jit_error is not None:
        raise RuntimeError(_cuda_jit_error)
    if not build:
        return None
    why = cuda_jit_unavailable_reason()
    if why is not None:
        # Not remembered: installing nvcc or ninja, or setting CUDA_HOME, fixes it in-process.
        raise RuntimeError("onepass: the CUDA kernels are not in the installed extension "
                           f"and cannot be JIT-built: {why}")
    try:
        module = build_cuda_jit()
    except Exception as exc:  # noqa: BLE001 - compiler errors come as many exception types
        text = str(exc).strip().splitlines()
        _cuda_jit_error = ("onepass: the JIT build of the CUDA kernels failed ("
                           + (text[-1] if text else type(exc).__name__)
                           + "); rerun onepass._ops.build_cuda_jit(verbose=True) to see the "
                           "compiler output")
        raise RuntimeError(_cuda_jit_error) from exc
    if not HAS_EXT:
        _register_fakes()  # the full JIT module defined the schema just now
    _cuda_module = module
    return module
