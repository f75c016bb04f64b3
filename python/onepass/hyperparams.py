"""The checks of a param group's settings (torch's wording where torch rejects the same input),
made before a step writes anything, and the decay-mode spelling."""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import reference
from .backends import BACKENDS

_STATE_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                      "int8": "int8"}
#: Tensors with fewer elements keep fp32 state under state_dtype="int8" (their absmax overhead
#: and kernel cost would outweigh the bytes saved: a 4096-element tensor saves 24 KB).
MIN_INT8_NUMEL = 4096


def _state_dtype(x) -> str:
    key = str(x).replace("torch.", "")
    if key not in _STATE_DTYPE_NAMES:
        raise ValueError(f"onepass: state_dtype must be 'fp32', 'bf16' or 'int8', got {x!r}")
    return _STATE_DTYPE_NAMES[key]


def _as_float(x: Union[float, Tensor], what: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"onepass: {what} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Raise ValueError for values torch.optim.AdamW rejects (and NaN), with torch's wording (the
    messages of torch/optim/adam.py, checked in its order: lr, eps, betas, weight_decay, mixed
    betas), so code that catches or matches torch's errors sees the same ones
    (tests/test_conformance.py runs torch's own error inputs). Not refused (torch refuses them
    only for its foreach implementation, which onepass does not have): a Tensor lr or Tensor
    betas with foreach=True. Refused in onepass's words where torch fails by accident: betas
    that are not a pair (torch: IndexError, or a third value ignored) and a multi-element Tensor
    beta (torch: RuntimeError "Boolean value of Tensor with more than one value is ambiguous";
    here torch's own "Tensor betas[i] must be 1-element")."""
    _check_lr(lr)
    if not _at_least_0(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"onepass: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element, got shape {tuple(b.shape)}")
        if not (_at_least_0(b) and _as_float(b, f"betas[{i}]") < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not _at_least_0(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    # (numbers of any kind count as floats: torch's check is isinstance(b, float), which also
    # refuses betas=(0, 0.99); onepass takes that)
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")


def _resolve_decay_mode(decay_mode: Optional[str], decoupled: Optional[bool],
                        default_decoupled: bool) -> Tuple[str, bool]:
    """(decay_mode, decoupled) from either spelling: ``decoupled=False`` is "coupled"; naming both
    is fine while they agree."""
    if decay_mode is None:
        decoupled = default_decoupled if decoupled is None else bool(decoupled)
        return ("decoupled" if decoupled else "coupled"), decoupled
    if decay_mode not in reference.DECAY_MODES:
        raise ValueError(f"onepass: decay_mode must be one of {reference.DECAY_MODES}, got {decay_mode!r}")
    if decoupled is not None and bool(decoupled) != (decay_mode != "coupled"):
        raise ValueError(f"onepass: decoupled={decoupled!r} contradicts decay_mode={decay_mode!r}")
    return decay_mode, decay_mode != "coupled"


#: A group's settings but lr: _check_group's memo key, and what a group's cached batches were
#: made with (the step reuses them while it is the same).
_SETTING_KEYS = ("betas", "eps", "weight_decay", "differentiable", "state_dtype", "amsgrad",
                 "param_rounding", "seed", "min_int8_numel", "decay_mode", "decoupled", "lr_max",
                 "backend", "maximize", "capturable", "statistics")


_VALUE_SLOTS = tuple(_SETTING_KEYS.index(k) for k in ("eps", "weight_decay", "lr_max"))
_BETAS_SLOT = _SETTING_KEYS.index("betas")


def _by_value(key: tuple) -> tuple:
    """``key`` with Tensor betas, eps, weight_decay and lr_max replaced by their values: a
    tensor filled in place (a momentum schedule's ``betas[0].fill_(...)``) is the same object
    with a new value, and the memo and the cached batches must see the change (one .item() a
    Tensor setting a step; floats cost one isinstance each)."""
    betas = key[_BETAS_SLOT]
    tensors = [i for i in _VALUE_SLOTS if _one_value(key[i])]
    tensor_betas = isinstance(betas, (tuple, list)) and any(_one_value(b) for b in betas)
    if not tensors and not tensor_betas:
        return key
    key = list(key)
    for i in tensors:
        key[i] = float(key[i].item())
    if tensor_betas:
        key[_BETAS_SLOT] = tuple(float(b.item()) if _one_value(b) else b for b in betas)
    return tuple(key)


def _one_value(x) -> bool:
    # (a tensor of several elements stays in the key: the full check refuses it in torch's words)
    return isinstance(x, Tensor) and x.numel() == 1


def _check_group(group: Dict[str, Any], memo: Optional[Dict[int, tuple]] = None) -> tuple:
    """Raises for a group setting onepass cannot run (torch's wording where torch has one);
    returns the group's settings key (_SETTING_KEYS). ``memo`` (the optimizer's, by group)
    skips the settings that are the same objects or equal values as at the last check: ~8 us of
    Python a group a step otherwise. lr is checked every time (a scheduler changes it every
    step)."""
    key = tuple(map(group.get, _SETTING_KEYS))
    if not torch.compiler.is_compiling():
        key = _by_value(key)
    if memo is not None:
        try:
            if memo.get(id(group)) == key:
                _check_lr(group["lr"])
                return key
        except RuntimeError:  # a Tensor compared with another by value: check them all
            pass
    _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    if group.get("differentiable"):
        raise ValueError("onepass: differentiable=True is not supported (the update is not differentiated)")
    fmt = _state_dtype(group.get("state_dtype", "fp32"))
    if fmt != "fp32" and group.get("amsgrad"):
        raise ValueError("onepass: amsgrad needs state_dtype='fp32' (the max of v is kept in full precision only)")
    rounding = group.get("param_rounding", "nearest")
    if rounding not in reference.PARAM_ROUNDINGS:
        raise ValueError(f"onepass: param_rounding must be one of {reference.PARAM_ROUNDINGS}, got {rounding!r}")
    if memo is None:  # (a step checks the params with grads when it makes their state lists)
        _check_rounding_dtypes(group["params"], rounding)
    seed = group.get("seed", 0)
    # (any integer type: a NumPy integer from a config or an rng is one)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"onepass: seed must be an int in [0, 2**32), got {seed!r}")
    mn = group.get("min_int8_numel", MIN_INT8_NUMEL)
    if not isinstance(mn, int) or mn < 0:
        raise ValueError(f"onepass: min_int8_numel must be an int >= 0, got {mn!r}")
    mode, _ = _resolve_decay_mode(group.get("decay_mode"), group.get("decoupled"), True)
    if mode == "lr_independent":
        reference.effective_weight_decay(group["weight_decay"], mode, group.get("lr_max"))
    name = group["backend"]
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"onepass: unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    if memo is not None:
        memo[id(group)] = key
    return key


def _check_rounding_dtypes(params: List[Tensor], rounding: str) -> None:
    """A rounding other than nearest is for bfloat16 params: float16 ones are refused. (On the
    params with grads, whenever the group's state lists are made: the cached plan holds the same
    param objects with the same dtypes.)"""
    if rounding == "nearest":
        return
    for p in params:
        if isinstance(p, Tensor) and p.dtype == torch.float16:
            raise ValueError(f"onepass: param_rounding={rounding!r} is for bfloat16 params "
                             "(float16 params round to nearest; keep an fp32 master copy)")


def _check_lr(lr) -> None:
    """_check_hyperparameters' lr part."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        # Not while torch.compile traces a step: reading the value (.item()) would break the
        # graph at every step; the check ran eagerly at construction (as torch.optim's does).
        if (lr.device.type == "cpu" and not torch.compiler.is_compiling()
                and not float(lr.item()) >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr}")
    elif not _at_least_0(lr):
        raise ValueError(f"Invalid learning rate: {lr}")


def _at_least_0(x) -> bool:
    """torch's own comparison (``0.0 <= x``): a str such as lr="0.1" raises torch's TypeError
    ("'<=' not supported between instances of 'float' and 'str'") instead of being read as a
    number; NaN is False, so its ValueError follows."""
    return bool(0.0 <= x)
