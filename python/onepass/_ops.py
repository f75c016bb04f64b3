"""Loads the compiled extension (onepass._C) and registers the fake implementations of its ops.

Importing onepass never fails because of the extension: when it is missing or cannot be loaded,
``EXT_ERROR`` says why, onepass warns once, and the "auto" backend uses the reference.
"""
from __future__ import annotations

import importlib.util
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

if HAS_EXT:

    @torch.library.register_fake("onepass::adam_step_")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr,
                        lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled,
                        grad_scale, found_inf) -> None:
        # In-place update of its inputs: nothing new to describe for tracing.
        return None
