"""onepass.AdamW and onepass.Adam: drop-in torch.optim optimizers over onepass's backends.

The optimizer groups params by (device, param dtype), lazily creates their state, checks every
input before anything is written, and hands each batch to its backend. The arithmetic lives in
reference.py (and its C++ twin); nothing here computes an update.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .backends import BACKENDS, Batch, resolve_backend
from .reference import PARAM_DTYPES, math_dtype

__all__ = ["AdamW", "Adam"]

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _as_float(x: Union[float, Tensor], what: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"onepass: {what} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Raise ValueError for values torch.optim.AdamW rejects (and NaN)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"onepass: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" and not float(lr.item()) >= 0.0:
            raise ValueError(f"Invalid learning rate: {float(lr.item())}")
    elif not float(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"onepass: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        b = _as_float(b, f"betas[{i}]")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not float(eps) >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_group(group: Dict[str, Any]) -> None:
    _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    if group.get("differentiable"):
        raise ValueError("onepass: differentiable=True is not supported (the update is not differentiated)")
    name = group["backend"]
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"onepass: unknown backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")


# Bumped by every write to a tracked optimizer state (below): the per-group cache of state lists
# is valid only while it stays the same.
_STATE_EPOCH = [0]


class _ParamState(dict):
    """The state dict of one param: a dict that records that it was written."""

    __slots__ = ()

    # Methods call dict's own explicitly (not super()) so _State below can share them.
    def __setitem__(self, k, v):
        _STATE_EPOCH[0] += 1
        dict.__setitem__(self, k, v)

    def __delitem__(self, k):
        _STATE_EPOCH[0] += 1
        dict.__delitem__(self, k)

    def _bump(name):  # noqa: N805 - builds the mutating methods below
        base = getattr(dict, name)

        def method(self, *args, **kwargs):
            _STATE_EPOCH[0] += 1
            return base(self, *args, **kwargs)

        method.__name__ = name
        return method

    clear = _bump("clear")
    pop = _bump("pop")
    popitem = _bump("popitem")
    setdefault = _bump("setdefault")
    update = _bump("update")
    __ior__ = _bump("__ior__")
    del _bump

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self),))


class _State(defaultdict):
    """Optimizer.state: a defaultdict of _ParamState that records that it was written."""

    def __init__(self, *args):
        super().__init__(_ParamState, *args)

    __setitem__ = _ParamState.__setitem__
    __delitem__ = _ParamState.__delitem__
    clear = _ParamState.clear
    pop = _ParamState.pop
    popitem = _ParamState.popitem
    setdefault = _ParamState.setdefault
    update = _ParamState.update
    __ior__ = _ParamState.__ior__

    def __reduce__(self):
        return (defaultdict, (dict,), None, None, iter(self.items()))


def _tracked(state) -> _State:
    out = _State()
    for k, v in state.items():
        dict.__setitem__(out, k, _ParamState(v) if type(v) is dict else v)
    return out


def _new_step() -> Tensor:
    # torch keeps a float32 0-dim CPU tensor (float64 when that is the default dtype); so do we,
    # so that state dicts move between torch.optim.AdamW and onepass unchanged.
    return torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


class AdamW(Optimizer):
    """AdamW (decoupled weight decay) with torch.optim.AdamW's signature and defaults.

    Extra keyword-only arguments:
        backend: "auto" (default), "cpu", "cuda", "triton" or "reference"; may differ per group.
        decoupled: True (default) shrinks params by ``1 - lr * weight_decay`` (AdamW); False adds
            ``weight_decay * p`` to the gradient (Adam with L2), as torch.optim.Adam does.

    ``foreach`` and ``fused`` are accepted for compatibility and ignored: onepass always runs one
    fused pass. ``differentiable=True`` is rejected. State keys and the ``step`` tensor match
    torch's, so state dicts load in both directions. Every backend gives the bits of
    ``onepass.reference``.
    """

    _decoupled_default = True

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        backend: str = "auto",
        decoupled: Optional[bool] = None,
    ):
        if decoupled is None:
            decoupled = self._decoupled_default
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if differentiable:
            raise ValueError("onepass: differentiable=True is not supported (the update is not differentiated)")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, backend=backend, decoupled=bool(decoupled),
        )
        self._batch_cache: Dict[int, tuple] = {}
        super().__init__(params, defaults)
        self.state = _State()
        # torch.amp.GradScaler hands over grad_scale / found_inf as attributes instead of
        # unscaling the grads itself (one pass less over the gradients).
        self._step_supports_amp_scaling = True

    # ---- param groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("onepass: params must be an ordered collection, not a set")
        params = list(params)
        devices = set()
        for p in params:
            if not isinstance(p, Tensor):
                continue  # torch's own check reports it
            if p.is_complex():
                raise TypeError(
                    "onepass: complex params are not supported; optimize torch.view_as_real(p) instead"
                )
            if p.dtype not in PARAM_DTYPES:
                raise TypeError(f"onepass: params must be float32, float64, bfloat16 or float16, got {p.dtype}")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                "onepass: all params of one group must be on one device, got "
                + ", ".join(sorted(str(d) for d in devices))
            )
        param_group = dict(param_group)
        param_group["params"] = params  # the list: a generator would be empty for torch now
        merged = dict(param_group)
        for k, v in self.defaults.items():
            merged.setdefault(k, v)
        _check_group(merged)
        super().add_param_group(param_group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = _tracked(self.state)
        self._batch_cache = {}
        # Groups loaded from a torch.optim state dict lack onepass's keys: use this optimizer's.
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    # ---- step ----------------------------------------------------------------------------------------
    def _group_batch(self, group: Dict[str, Any], grad_scale, found_inf) -> Optional[Tuple[Any, Batch, list]]:
        """The batch of one group (every param with a grad), its backend, and the params whose
        state this call created (so a failed step can take them back)."""
        params = group["params"]
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            return None
        amsgrad = bool(group["amsgrad"])
        mode = (amsgrad, bool(group["capturable"]))
        # The state lists of a group are cached between steps: looking up 2000 params' state
        # costs ~2 ms of Python per step, a fifth of the whole `small` step. The cache is valid
        # while the same params have grads and no state dict was written (_STATE_EPOCH).
        ids = [id(p) for p in params]
        cache = self._batch_cache.get(id(group))
        created: list = []
        if (
            cache is not None and cache[0] == ids and cache[1] == _STATE_EPOCH[0]
            and cache[2] is self.state and cache[3] == mode
        ):
            lists, scratch = cache[4], cache[5]
        else:
            lists, tracked = self._state_lists(params, amsgrad, created, bool(group["capturable"]))
            scratch = {}
            if tracked:
                self._batch_cache[id(group)] = (ids, _STATE_EPOCH[0], self.state, mode, lists, scratch)
            else:  # a plain dict put in by hand: its writes are not seen, so never cache it
                self._batch_cache.pop(id(group), None)
        device = params[0].device
        backend = resolve_backend(group["backend"], device)
        if group["capturable"] and device.type == "cuda" and backend.name != "cuda":
            raise RuntimeError(
                "onepass: capturable=True needs the cuda backend (it keeps the step count on the "
                f"device); the {backend.name!r} backend reads it on the host"
            )
        beta1, beta2 = group["betas"]
        batch = Batch(
            params=params, grads=grads, exp_avgs=lists[0], exp_avg_sqs=lists[1],
            max_exp_avg_sqs=lists[2], steps=lists[3], lr=group["lr"],
            beta1=_as_float(beta1, "beta1"), beta2=_as_float(beta2, "beta2"),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), amsgrad=amsgrad,
            maximize=bool(group["maximize"]), decoupled=bool(group["decoupled"]),
            grad_scale=grad_scale, found_inf=found_inf, device=device, scratch=scratch,
        )
        return backend, batch, created

    def _state_lists(self, params: List[Tensor], amsgrad: bool, created: list, capturable: bool = False):
        """((exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps), tracked) of ``params``, creating
        missing state; ``tracked`` is False when some param's state is a plain dict put there by
        hand (its writes are not seen, so the lists must not be cached)."""
        exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
        tracked = True
        state_of = self.state
        for p in params:
            st = state_of[p]
            is_new = not st
            if is_new:
                created.append(p)
                dt = math_dtype(p.dtype)
                st["step"] = _new_step()
                st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            if capturable and p.is_cuda and not st["step"].is_cuda:
                # capturable: the count lives on the device so a CUDA graph can advance it
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            if amsgrad and "max_exp_avg_sq" not in st:
                if not is_new:
                    raise RuntimeError(
                        "onepass: amsgrad was switched on for a param whose state has no "
                        "max_exp_avg_sq; start it from a fresh optimizer or load a state with it"
                    )
                st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"], memory_format=torch.preserve_format)
            tracked = tracked and type(st) is _ParamState
            steps.append(st["step"])
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(st["max_exp_avg_sq"])
        return (exp_avgs, exp_avg_sqs, max_sqs, steps), tracked

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. Every input is checked before any param or state is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan: List[Tuple[Any, Batch]] = []
        created: list = []
        try:
            for group in self.param_groups:
                _check_group(group)
                item = self._group_batch(group, grad_scale, found_inf)
                if item is not None:
                    plan.append(item[:2])
                    created.extend(item[2])
            for backend, batch in plan:
                # A kernel checks its own batch before writing it; a step over several batches
                # checks all of them before the first write.
                if len(plan) > 1 or not backend.checks_before_writing:
                    backend.validate(batch)
            for backend, batch in plan:
                backend.step(batch)
        except Exception:
            # A failed step leaves no new state behind. (Checks run before any batch is written,
            # so no batch has been written when one of them raises.)
            for p in created:
                self.state.pop(p, None)
            raise
        return loss

    # ---- state dict ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a onepass or torch.optim.Adam(W) state dict; all or nothing.

        Everything is checked before the optimizer changes: group and param counts, state keys,
        moment shapes, step counts. Moments are copied into this optimizer's own tensors in the
        math dtype (float32 for bf16/fp16 params, so an fp32 state is never rounded on load) and
        in the param's memory layout.
        """
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("onepass: a state dict needs the keys 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"onepass: the state dict has {len(saved_groups)} param groups, this optimizer "
                f"has {len(self.param_groups)}"
            )
        id_map: Dict[Any, Tensor] = {}
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(
                    f"onepass: param group {gi} has {len(saved['params'])} params in the state "
                    f"dict and {len(mine['params'])} here"
                )
            for pid, p in zip(saved["params"], mine["params"]):
                id_map[pid] = p
        amsgrad_of = {}
        for mine, saved in zip(self.param_groups, saved_groups):
            for pid in saved["params"]:
                amsgrad_of[pid] = bool(saved.get("amsgrad", mine["amsgrad"]))

        new_state: Dict[Tensor, Dict[str, Any]] = {}
        for pid, st in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"onepass: the state dict has state for param {pid!r}, which no group lists")
            p = id_map[pid]
            new_state[p] = self._load_param_state(p, st, pid, amsgrad_of[pid])

        param_groups = []
        for mine, saved in zip(self.param_groups, saved_groups):
            group = dict(saved)
            group["params"] = mine["params"]
            if "param_names" in mine and "param_names" not in group:
                group["param_names"] = mine["param_names"]
            param_groups.append(group)
        for group in param_groups:
            merged = dict(group)
            for k, v in self.defaults.items():
                merged.setdefault(k, v)
            _check_group(merged)

        state = _State()
        for p, st in new_state.items():
            state[p] = _ParamState(st)
        self.__setstate__({"state": state, "param_groups": param_groups})
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def state_dict(self) -> Dict[str, Any]:
        """torch's state dict, with each param's state as a plain dict (loadable without onepass)."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
        return sd

    @staticmethod
    def _load_param_state(p: Tensor, st: Dict[str, Any], pid: Any, amsgrad: bool) -> Dict[str, Any]:
        if not isinstance(st, dict):
            raise ValueError(f"onepass: the state of param {pid!r} is not a dict")
        if not st:
            return {}
        unknown = set(st) - set(_STATE_KEYS)
        if unknown:
            raise ValueError(f"onepass: unknown state keys {sorted(unknown)} for param {pid!r}")
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
        if amsgrad and "max_exp_avg_sq" not in st:
            missing.append("max_exp_avg_sq")
        if missing:
            raise ValueError(f"onepass: the state of param {pid!r} lacks {missing}")
        step = st["step"]
        step_value = _as_float(step, "step") if isinstance(step, (Tensor, int, float)) else math.nan
        if not (step_value >= 0 and step_value == math.floor(step_value) and step_value < 2**24):
            raise ValueError(f"onepass: the step of param {pid!r} must be a whole number >= 0, got {step!r}")
        out: Dict[str, Any] = {"step": torch.tensor(step_value, dtype=_new_step().dtype)}
        dt = math_dtype(p.dtype)
        for k in _MOMENT_KEYS:
            if k not in st:
                continue
            v = st[k]
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise ValueError(f"onepass: state {k!r} of param {pid!r} must be a floating-point tensor")
            if v.shape != p.shape:
                raise ValueError(
                    f"onepass: state {k!r} of param {pid!r} has shape {tuple(v.shape)}, its param "
                    f"has shape {tuple(p.shape)}"
                )
            out[k] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format).copy_(v)
        return out


class Adam(AdamW):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam's defaults: no decay).

    ``onepass.Adam(params, weight_decay=wd)`` is ``onepass.AdamW(..., decoupled=False)``.
    ``decoupled_weight_decay=True`` (torch.optim.Adam's spelling) gives AdamW's update.
    """

    _decoupled_default = False

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        decoupled: Optional[bool] = None,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused, backend=backend,
            decoupled=decoupled_weight_decay if decoupled is None else decoupled,
        )
