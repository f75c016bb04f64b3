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
from .reference import math_dtype

__all__ = ["AdamW", "Adam"]

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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
        super().__init__(params, defaults)
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
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"onepass: params must be float32, float64, bfloat16 or float16, got {p.dtype}")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                "onepass: all params of one group must be on one device, got "
                + ", ".join(sorted(str(d) for d in devices))
            )
        merged = dict(param_group)
        for k, v in self.defaults.items():
            merged.setdefault(k, v)
        _check_group(merged)
        super().add_param_group(param_group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups loaded from a torch.optim state dict lack onepass's keys: use this optimizer's.
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    # ---- step ----------------------------------------------------------------------------------------
    def _batches(self, group: Dict[str, Any], grad_scale, found_inf) -> List[Tuple[Any, Batch]]:
        buckets: Dict[Tuple[torch.device, torch.dtype], List[Tuple[Tensor, Tensor]]] = {}
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.layout is not torch.strided or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                self._bad_grad(p, g)
            key = (p.device, p.dtype)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = []
            bucket.append((p, g))
        out = []
        beta1, beta2 = group["betas"]
        for (device, _dtype), pairs in buckets.items():
            backend = resolve_backend(group["backend"], device)
            if group["capturable"] and device.type != "cpu" and backend.name == "reference":
                raise RuntimeError(
                    "onepass: capturable=True needs a backend that keeps the step count on the "
                    f"device; the {backend.name!r} backend reads it on the host"
                )
            out.append((backend, pairs, device))
        return [
            (backend, Batch(
                params=[p for p, _ in pairs], grads=[g for _, g in pairs],
                exp_avgs=[], exp_avg_sqs=[], max_exp_avg_sqs=[], steps=[],
                lr=group["lr"], beta1=_as_float(beta1, "beta1"), beta2=_as_float(beta2, "beta2"),
                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]),
                decoupled=bool(group["decoupled"]), grad_scale=grad_scale, found_inf=found_inf,
                device=device,
            ))
            for backend, pairs, device in out
        ]

    @staticmethod
    def _bad_grad(p: Tensor, g: Tensor) -> None:
        if g.layout is not torch.strided:
            raise RuntimeError("onepass: sparse gradients are not supported; use torch.optim.SparseAdam")
        if g.shape != p.shape:
            raise RuntimeError(f"onepass: a grad has shape {tuple(g.shape)} but its param has shape {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise RuntimeError(f"onepass: a grad is {g.dtype} but its param is {p.dtype}")
        raise RuntimeError(f"onepass: a grad is on {g.device} but its param is on {p.device}")

    def _fill_state(self, batch: Batch) -> None:
        state_of = self.state
        for p in batch.params:
            st = state_of[p]
            if not st:
                dt = math_dtype(p.dtype)
                st["step"] = _new_step()
                st["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            if batch.amsgrad and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"], memory_format=torch.preserve_format)
            batch.steps.append(st["step"])
            batch.exp_avgs.append(st["exp_avg"])
            batch.exp_avg_sqs.append(st["exp_avg_sq"])
            if batch.amsgrad:
                batch.max_exp_avg_sqs.append(st["max_exp_avg_sq"])

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
        for group in self.param_groups:
            _check_group(group)
            plan.extend(self._batches(group, grad_scale, found_inf))
        for backend, batch in plan:
            self._fill_state(batch)
            backend.validate(batch)
        for backend, batch in plan:
            backend.step(batch)
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

        state: Dict[Tensor, Dict[str, Any]] = defaultdict(dict)
        state.update(new_state)
        self.__setstate__({"state": state, "param_groups": param_groups})
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

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
