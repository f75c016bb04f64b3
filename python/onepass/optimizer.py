"""onepass.AdamW and onepass.Adam: drop-in torch.optim optimizers over onepass's backends.

The optimizer groups params by (device, param dtype), lazily creates their state, checks every
input before anything is written, and hands each batch to its backend. The arithmetic lives in
reference.py (and its C++ twin); nothing here computes an update.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import quant, reference
from ._plan import GroupCache, PlanGrads, make_plan
from .backends import BACKENDS, Batch, auto_candidates, resolve_backend
from .reference import PARAM_DTYPES, math_dtype

__all__ = ["AdamW", "Adam", "torch_state_dict"]

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_absmax",
               "exp_avg_sq_absmax", "kahan_comp")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                      "int8": "int8"}
#: Tensors with fewer elements keep fp32 state under state_dtype="int8" (their absmax overhead
#: and kernel cost would outweigh the bytes saved: a 4096-element tensor saves 24 KB).
MIN_INT8_NUMEL = 4096

# ---- complex params ---------------------------------------------------------------------------------
# As torch.optim.Adam(W) does, a complex param is optimized as torch.view_as_real(p): its real and
# imaginary parts are independent real params, and the update runs on view_as_real of the param,
# its grad and its moments. The optimizer makes those views; backends only ever see real tensors
# (a complex64 param is a float32 [..., 2] tensor to them), so every backend takes complex params
# and gives the reference's bits on them. The state is kept as torch keeps it: moments of the
# param's complex dtype and shape (the real math dtype of a complex64 param is float32, of a
# complex128 param float64), so state dicts move between onepass and torch.optim.AdamW unchanged.
# Complex params always keep that full-precision state: no complex bf16 dtype exists, and bf16 or
# int8 moments of shape [..., 2] would no longer look like torch's (so state_dtype="bf16"/"int8"
# applies to a group's real params only, as int8 applies only to large tensors).
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _real(t: Any) -> Any:
    """torch.view_as_real(t) for a complex tensor (resolving a lazy conjugate first), else t."""
    if isinstance(t, Tensor) and t.is_complex():
        return torch.view_as_real(t.resolve_conj() if t.is_conj() else t)
    return t


def _moment_dtype(p: Tensor) -> torch.dtype:
    """The dtype of a param's full-precision moments: the math dtype of a real param (float32 for
    bf16/fp16/fp32, float64 for fp64), the param's own dtype for a complex one (as torch)."""
    return p.dtype if p.is_complex() else math_dtype(p.dtype)


def _state_dtype(x) -> str:
    key = str(x).replace("torch.", "")
    if key not in _STATE_DTYPE_NAMES:
        raise ValueError(f"onepass: state_dtype must be 'fp32', 'bf16' or 'int8', got {x!r}")
    return _STATE_DTYPE_NAMES[key]


def param_state_format(p: Tensor, state_dtype: str, min_int8_numel: int = MIN_INT8_NUMEL) -> str:
    """The state format a param gets in a group with ``state_dtype``: float64 params always keep
    float64 ("fp32", the math dtype) state; int8 only for tensors of >= 2 dims (blocks lie within
    dim-0 rows, so dim-0 sharding cannot change them) with at least ``min_int8_numel`` elements;
    complex params always keep full-precision (complex) state, as torch does."""
    if p.dtype == torch.float64 or p.is_complex():
        return "fp32"
    if state_dtype == "int8" and (p.dim() < 2 or p.numel() < min_int8_numel):
        return "fp32"
    return state_dtype


def _stored_format(st: Dict[str, Any]) -> str:
    m = st.get("exp_avg")
    if isinstance(m, Tensor) and m.dtype == torch.uint8:
        return "int8"
    if isinstance(m, Tensor) and m.dtype == torch.bfloat16:
        return "bf16"
    return "fp32"


def decode_moments(p: Tensor, st: Dict[str, Any]) -> Dict[str, Tensor]:
    """The moments of one param's state as math-dtype tensors (int8 dequantized, bf16 widened)."""
    if _is_dtensor(p):
        local = decode_moments(_local(p), {k: _local(v) for k, v in st.items()})
        return {k: _wrap_state(p, k, v) for k, v in local.items()}
    fmt = _stored_format(st)
    dt = _moment_dtype(p)
    out = {}
    for k, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        x = st[k]
        if fmt == "int8":
            code = quant.code_table(quant.SIGNED_MAP if signed else quant.UNSIGNED_MAP, signed)
            out[k] = reference.dequantize_blocks(x, st[k + "_absmax"], code)
        else:
            out[k] = x.to(dt)
    if "max_exp_avg_sq" in st:
        out["max_exp_avg_sq"] = st["max_exp_avg_sq"].to(dt)
    return out


def encode_moments(p: Tensor, moments: Dict[str, Tensor], fmt: str) -> Dict[str, Tensor]:
    """Math-dtype moments in state format ``fmt`` (bf16: nearest even; int8: quantize_blocks)."""
    if _is_dtensor(p):
        _check_int8_placements(p, fmt)
        local = encode_moments(_local(p), {k: _local(v) for k, v in moments.items()}, fmt)
        return {k: _wrap_state(p, k, v) for k, v in local.items()}
    out: Dict[str, Tensor] = {}
    for k, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        x = moments[k]
        if fmt == "int8":
            mid = quant.midpoints(quant.SIGNED_MAP if signed else quant.UNSIGNED_MAP, signed)
            q, a = reference.quantize_blocks(x.contiguous().to(torch.float32), mid,
                                             keep_positive=not signed)
            out[k], out[k + "_absmax"] = q.contiguous(), a.contiguous()
        elif fmt == "bf16":
            out[k] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format).copy_(x)
        else:
            out[k] = torch.zeros_like(p, dtype=_moment_dtype(p), memory_format=torch.preserve_format).copy_(x)
    if "max_exp_avg_sq" in moments:
        out["max_exp_avg_sq"] = moments["max_exp_avg_sq"]
    return out


def _convert_state(p: Tensor, st: Dict[str, Any], fmt: str) -> None:
    """Re-encodes one param's moments (in place in ``st``) from their stored format into ``fmt``."""
    moments = decode_moments(p, st)
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        st.pop(k, None)
    st.update(encode_moments(p, moments, fmt))


def _new_moments(p: Tensor, fmt: str) -> Dict[str, Tensor]:
    if _is_dtensor(p):
        _check_int8_placements(p, fmt)
        return {k: _wrap_state(p, k, v) for k, v in _new_moments(_local(p), fmt).items()}
    if fmt == "int8":
        rows_blocks = reference.absmax_shape(p.shape)
        return {
            "exp_avg": torch.zeros(p.shape, dtype=torch.uint8, device=p.device).fill_(_zero_code(True)),
            "exp_avg_sq": torch.zeros(p.shape, dtype=torch.uint8, device=p.device).fill_(_zero_code(False)),
            "exp_avg_absmax": torch.zeros(rows_blocks, dtype=torch.float32, device=p.device),
            "exp_avg_sq_absmax": torch.zeros(rows_blocks, dtype=torch.float32, device=p.device),
        }
    dt = torch.bfloat16 if fmt == "bf16" else _moment_dtype(p)
    return {"exp_avg": torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)}


# ---- DTensor params (FSDP2) ------------------------------------------------------------------------
# Under FSDP2 (fully_shard) params and grads are DTensors sharded on dim 0. The kernels take plain
# tensors, so a step runs on the local shards: to_local() is the DTensor's own storage, so writing
# it is the update. State is kept as DTensors with the param's mesh and placements, as
# torch.optim.AdamW's is, because torch.distributed.checkpoint (get/set_optimizer_state_dict,
# dcp.save/load) expects state shaped like its param; an int8 moment's absmax [rows, blocks per
# row] is sharded on dim 0 alike, so its local shard is the absmax of the local rows. The math is
# elementwise and int8 blocks lie within dim-0 rows, so dim-0 sharding (or replication) gives the
# bits of an unsharded run; int8 state under any other sharding would not, and is refused.

def _dtensor_type():
    """torch's DTensor class once torch.distributed.tensor is imported (no DTensor can exist
    before), else None: looked up, not imported, so builds without torch.distributed work."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _local(t: Any) -> Any:
    """A DTensor's local shard (its own storage, also under autograd), anything else unchanged."""
    if not _is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def _local_grad(p: Tensor, g: Tensor) -> Tensor:
    """The local shard of DTensor param ``p``'s grad, laid out as ``p`` is (FSDP2's grads are)."""
    if _is_dtensor(g) and (g.device_mesh != p.device_mesh or g.placements != p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return _local(g)


def _local_absmax(a: Tensor) -> Tensor:
    """An absmax's local shard as the kernels expect it: a shard with no rows is [0, 0] to them
    (no row, no block) but [0, blocks] as part of the global [rows, blocks]."""
    a = _local(a)
    return a[:, :0] if a.dim() == 2 and a.shape[0] == 0 else a


def _check_int8_placements(p: Tensor, fmt: str) -> None:
    if fmt != "int8":
        return
    from torch.distributed.tensor import Replicate, Shard
    for pl in p.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise ValueError(
                f"onepass: int8 state needs a param that is replicated or sharded on dim 0 (its "
                f"blocks lie within dim-0 rows), got placements {tuple(p.placements)}; use "
                f"state_dtype='fp32' or 'bf16' for it, or min_int8_numel to exclude it")


def _wrap_state(p: Tensor, k: str, t: Tensor) -> Tensor:
    """Local state tensor ``t`` (key ``k``) of DTensor param ``p`` as a DTensor with p's mesh and
    placements: shaped like p, or for an absmax [rows, blocks per row] of p's global shape."""
    if k.endswith("_absmax"):
        shape = tuple(reference.absmax_shape(p.shape))
        if t.shape[0] == 0:  # no local rows: [0, 0] from the local shape, [0, blocks] globally
            t = t.new_zeros((0, shape[1]))
        stride = (shape[1], 1)
    else:
        shape, stride = tuple(p.shape), tuple(p.stride())
    return _dtensor_type().from_local(t, p.device_mesh, p.placements, run_check=False,
                                      shape=torch.Size(shape), stride=stride)


def _zero_code(signed: bool) -> int:
    code = quant.code_table(quant.SIGNED_MAP if signed else quant.UNSIGNED_MAP, signed)
    return int((code == 0).nonzero()[0])


def torch_state_dict(optimizer: "AdamW") -> Dict[str, Any]:
    """``optimizer.state_dict()`` with every moment as a float32/float64 tensor of the param's
    shape and no onepass-only keys: loadable by torch.optim.AdamW / Adam (int8 dequantized, bf16
    widened; a Kahan compensation is dropped, so the param itself is what torch continues from)."""
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    state = {}
    for pid, st in sd["state"].items():
        if not st:
            state[pid] = st
            continue
        p = by_id[pid]
        out = {"step": st["step"]}
        out.update(decode_moments(p, st))
        state[pid] = out
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        for k in ("state_dtype", "param_rounding", "seed", "min_int8_numel", "backend", "decoupled"):
            g.pop(k, None)
        groups.append(g)
    return {"state": state, "param_groups": groups}


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
    if not float(eps) >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"onepass: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element, got shape {tuple(b.shape)}")
        if not 0.0 <= _as_float(b, f"betas[{i}]") < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not float(weight_decay) >= 0.0:
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


def _check_group(group: Dict[str, Any], memo: Optional[Dict[int, tuple]] = None) -> tuple:
    """Raises for a group setting onepass cannot run (torch's wording where torch has one);
    returns the group's settings key (_SETTING_KEYS). ``memo`` (the optimizer's, by group)
    skips the settings that are the same objects or equal values as at the last check: ~8 us of
    Python a group a step otherwise. lr is checked every time (a scheduler changes it every
    step)."""
    key = tuple(map(group.get, _SETTING_KEYS))
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
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
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
    elif not float(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")


class _ParamState(dict):
    """The state dict of one param: a dict that records that it was written, in ``_epoch``, the
    one-element counter of the optimizer whose state it is (its per-group caches are valid
    only while the counter stays the same; another optimizer's writes do not touch it)."""

    __slots__ = ("_epoch",)

    def __init__(self, *args, epoch: Optional[List[int]] = None):
        dict.__init__(self, *args)
        self._epoch = [0] if epoch is None else epoch

    # Methods call dict's own explicitly (not super()) so _State below can share them.
    def __setitem__(self, k, v):
        self._epoch[0] += 1
        dict.__setitem__(self, k, v)

    def __delitem__(self, k):
        self._epoch[0] += 1
        dict.__delitem__(self, k)

    def _bump(name):  # noqa: N805 - builds the mutating methods below
        base = getattr(dict, name)

        def method(self, *args, **kwargs):
            self._epoch[0] += 1
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
    """Optimizer.state: a defaultdict of _ParamState that records that it, or any param's state
    in it, was written (``_epoch``, shared with every _ParamState it holds)."""

    def __init__(self, *args):
        super().__init__(None, *args)
        self._epoch = [0]

    def __missing__(self, key):
        value = _ParamState(epoch=self._epoch)
        self[key] = value  # (a write: counted)
        return value

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
        dict.__setitem__(out, k, _ParamState(v, epoch=out._epoch) if type(v) is dict else v)
    return out


def _epoch_of(state) -> int:
    """The write counter of an optimizer's state (-1 for a state that is not a _State, whose
    writes are not seen: its caches are never used)."""
    epoch = getattr(state, "_epoch", None)
    return -1 if epoch is None else epoch[0]


def _new_step() -> Tensor:
    # torch keeps a float32 0-dim CPU tensor (float64 when that is the default dtype); so do we,
    # so that state dicts move between torch.optim.AdamW and onepass unchanged.
    return torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


def _group_backend(name: str, device: torch.device, capturable: bool):
    """The backend of a group on ``device`` (resolve_backend's), except for capturable=True on CUDA
    tensors: only the cuda backend keeps the step count on the device, where a CUDA graph can
    advance it (triton and the reference read it on the host), so "auto" takes cuda for such a
    group whatever auto's order says, and any other backend is an error that says why."""
    if not (capturable and device.type == "cuda"):
        return resolve_backend(name, device)
    if name == "auto":
        cuda = BACKENDS["cuda"]
        why = cuda.auto_reason(device)
        if why is not None:
            raise RuntimeError(
                "onepass: capturable=True needs the cuda backend (it keeps the step count on the "
                f"device; triton and the reference read it on the host), and backend='auto' cannot "
                f"use it here: {why}"
            )
        return cuda
    backend = resolve_backend(name, device)
    if backend.name != "cuda":
        raise RuntimeError(
            "onepass: capturable=True needs the cuda backend (it keeps the step count on the "
            f"device); the {backend.name!r} backend reads it on the host"
        )
    return backend


#: torch.cuda.is_available(), asked once (see _cuda_available): step() asks whether the current
#: stream is capturing only where CUDA exists, so a step on a machine without it pays one call.
_CUDA_AVAILABLE: Optional[bool] = None


def _cuda_available() -> bool:
    global _CUDA_AVAILABLE
    if _CUDA_AVAILABLE is None:
        _CUDA_AVAILABLE = bool(torch.cuda.is_available())
    return _CUDA_AVAILABLE


def _capture_health_check(optimizer: "AdamW") -> None:
    """torch.optim's check (Optimizer._accelerator_graph_capture_health_check, with its wording)
    for a step() being captured in a CUDA graph, plus onepass's lr check. A graph replays only
    device work: a capturable=False group's host step counts and a host-side lr would be frozen
    at their values at capture. Called only while the current stream is capturing."""
    if not all(group["capturable"] for group in optimizer.param_groups):
        raise RuntimeError(
            "Attempting CUDA graph capture of step() for an instance of "
            + optimizer.__class__.__name__
            + " but param_groups' capturable is False."
        )
    for i, group in enumerate(optimizer.param_groups):
        lr, params = group["lr"], group["params"]
        if isinstance(lr, Tensor) and params and lr.device != params[0].device:
            raise RuntimeError(
                f"onepass: attempting CUDA graph capture of step() with param group {i}'s lr a "
                f"Tensor on {lr.device} while its params are on {params[0].device}: the graph "
                "would keep the lr read at capture. Give the group a one-element lr Tensor on the "
                "params' device and update it in place (lr.fill_(new_lr))."
            )


class AdamW(Optimizer):
    """AdamW (decoupled weight decay) with torch.optim.AdamW's signature and defaults.

    Extra keyword-only arguments:
        backend: "auto" (default), "cpu", "cuda", "triton" or "reference"; may differ per group.
        decoupled: True (default) shrinks params by ``1 - lr * weight_decay`` (AdamW); False adds
            ``weight_decay * p`` to the gradient (Adam with L2), as torch.optim.Adam does.
        decay_mode: the same choice by name, with a third mode: "decoupled" (default, shrink by
            ``lr * weight_decay``), "lr_independent" (shrink by ``weight_decay * lr / lr_max``: a
            schedule still scales the shrink, but the peak lr no longer does, so lr and
            weight_decay can be tuned apart) or "coupled" (Adam + L2, = ``decoupled=False``).
        lr_max: the peak lr of "lr_independent" (default: each group's lr when it is added).
        statistics: compute each param's ‖w‖ and ‖Δw‖ inside the update pass (per group too);
            :meth:`statistics` returns them after a step.

        state_dtype: "fp32" (default), "bf16" (stochastically rounded bf16 moments: 4 bytes a
            param) or "int8" (blockwise 8-bit moments: ~2.03 bytes a param; tensors of one dim
            or fewer than ``min_int8_numel`` = 4096 elements keep fp32 state). Not with amsgrad.
        param_rounding: how bf16 params are written: "nearest" (default), "stochastic" or
            "kahan" (a bf16 compensation buffer in the state, key "kahan_comp").
        seed: keys the random bits of stochastic rounding (reproducible on every backend).

    ``foreach`` and ``fused`` are accepted for compatibility and ignored: onepass always runs one
    fused pass. ``differentiable=True`` is rejected. State keys and the ``step`` tensor match
    torch's, so state dicts load in both directions. Every backend gives the bits of
    ``onepass.reference``. Complex (complex64/complex128) params are optimized as torch does, as
    ``torch.view_as_real(p)``, with complex moments of the param's dtype (whatever state_dtype).
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
        state_dtype: str = "fp32",
        param_rounding: str = "nearest",
        seed: int = 0,
        min_int8_numel: int = MIN_INT8_NUMEL,
        decay_mode: Optional[str] = None,
        lr_max: Optional[float] = None,
        statistics: bool = False,
    ):
        decay_mode, decoupled = _resolve_decay_mode(decay_mode, decoupled, self._decoupled_default)
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if differentiable:
            raise ValueError("onepass: differentiable=True is not supported (the update is not differentiated)")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, backend=backend, decoupled=bool(decoupled),
            state_dtype=state_dtype, param_rounding=param_rounding, seed=seed,
            min_int8_numel=min_int8_numel, decay_mode=decay_mode, lr_max=lr_max,
            statistics=bool(statistics),
        )
        self._batch_cache: Dict[int, GroupCache] = {}
        self._checked: Dict[int, tuple] = {}  # _check_group's memo
        _cuda_available()  # asked once, here, not while a step is traced or captured
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
            if p.dtype not in PARAM_DTYPES and p.dtype not in COMPLEX_DTYPES:
                raise TypeError("onepass: params must be float32, float64, bfloat16, float16, "
                                f"complex64 or complex128, got {p.dtype}")
            devices.add(p.device)
        if len(devices) > 1:
            raise ValueError(
                "onepass: all params of one group must be on one device, got "
                + ", ".join(sorted(str(d) for d in devices))
            )
        param_group = dict(param_group)
        param_group["params"] = params  # the list: a generator would be empty for torch now
        if "decay_mode" in param_group or "decoupled" in param_group:
            # a group may name either spelling; the other follows from it
            param_group["decay_mode"], param_group["decoupled"] = _resolve_decay_mode(
                param_group.get("decay_mode"), param_group.get("decoupled"), True)
        merged = dict(param_group)
        for k, v in self.defaults.items():
            merged.setdefault(k, v)
        if merged["decay_mode"] == "lr_independent" and merged.get("lr_max") is None:
            # the lr the group starts with is its peak: schedules scale it down from there
            param_group["lr_max"] = merged["lr_max"] = _as_float(merged["lr"], "lr")
        _check_group(merged)
        super().add_param_group(param_group)

    #: Public attributes set after construction that copy.deepcopy and pickle keep (torch's
    #: Optimizer.__getstate__ keeps defaults, state and param_groups only).
    _PICKLED_ATTRIBUTES = ("last_backends",)

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        for k in self._PICKLED_ATTRIBUTES:
            if k in self.__dict__:
                state[k] = self.__dict__[k]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # (also called by load_state_dict with state and param_groups only: what it does not
        # name, e.g. last_backends, stays as it is)
        super().__setstate__(state)
        self.state = _tracked(self.state)
        self._batch_cache = {}
        self._checked = {}
        self._step_supports_amp_scaling = True  # (a copy takes GradScaler's scale as we do)
        # Groups loaded from a torch.optim state dict lack onepass's keys: use this optimizer's.
        for group in self.param_groups:
            if "decay_mode" not in group and "decoupled" in group:  # saved before decay modes
                group["decay_mode"] = "decoupled" if group["decoupled"] else "coupled"
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    # ---- step ----------------------------------------------------------------------------------------
    def _group_batch(self, group: Dict[str, Any], grad_scale, found_inf,
                     key: Optional[tuple] = None) -> List[Tuple[Any, Batch, list]]:
        """The batches of one group (every param with a grad, one batch per state format and
        param rounding), their backend, and the params whose state this call created (so a
        failed step can take them back). ``key``: the group's settings (_check_group's)."""
        all_params = group["params"]
        if not all_params:
            return []
        cache = self._batch_cache.get(id(group))
        if (key is not None and cache is not None and cache.batches is not None
                and cache.batch_key == key and cache.epoch == _epoch_of(self.state)
                and cache.state is self.state and not torch.compiler.is_compiling()
                and cache.plan.gather(all_params)):
            # Same settings, state and params as the last step, and the plan has read this
            # step's grads: last step's batches with this step's lr, grad scale and statistics.
            return self._reuse_batches(group, cache, grad_scale, found_inf)
        amsgrad = bool(group["amsgrad"])
        fmt = _state_dtype(group.get("state_dtype", "fp32"))
        rounding = group.get("param_rounding", "nearest")
        min_int8 = group.get("min_int8_numel", MIN_INT8_NUMEL)
        device = all_params[0].device
        # capturable changes only CUDA params' state; and torch.compile's view of every group
        # says capturable=True (dynamo's OptimizerVariable), which must not make CPU params'
        # cached lists look stale (a traced step would rebuild them, breaking the graph).
        mode = (amsgrad, bool(group["capturable"]) and device.type == "cuda", fmt, rounding, min_int8)
        # (before any state is created: an error here leaves nothing behind)
        capturable_cuda = bool(group["capturable"]) and device.type == "cuda"
        backend = _group_backend(group["backend"], device, capturable_cuda)
        created: list = []
        fresh = (cache is not None and cache.epoch == _epoch_of(self.state) and cache.state is self.state
                 and cache.mode == mode)
        if (fresh and cache.plan is not None and not torch.compiler.is_compiling()
                and cache.plan.gather(all_params)):
            # The plan (csrc/group_plan.h) still fits: same params, same grads present, same
            # storage; it has read this step's grads in C++. No per-param Python work.
            parts, grads, plan = cache.parts, None, cache.plan
            dtensors, complexes = cache.dtensors, cache.complexes
        else:
            grads = [p.grad for p in all_params]
            params = all_params
            if any(g is None for g in grads):
                params = [p for p, g in zip(params, grads) if g is not None]
                grads = [g for g in grads if g is not None]
            if not params:
                return []
            # The state lists of a group are cached between steps: looking up 2000 params' state
            # costs ~2 ms of Python per step. Valid while the same params have grads and no
            # state dict was written (the state's write counter, _State._epoch).
            _check_rounding_dtypes(params, rounding)
            ids = [id(p) for p in params]
            if fresh and cache.ids == ids:
                parts, dtensors, complexes = cache.parts, cache.dtensors, cache.complexes
            else:
                parts, tracked = self._state_lists(params, amsgrad, created,
                                                   bool(group["capturable"]), fmt, rounding, min_int8)
                # FSDP2's params are DTensors (see _local): found once here, not per step (torch
                # imports DTensor itself, so the test would cost ~0.5 us a param every step)
                dtensors = _dtensor_type() is not None and any(_is_dtensor(p) for p in params)
                complexes = any(p.is_complex() for p in params)
                cache = GroupCache(ids, _epoch_of(self.state), self.state, mode, parts, dtensors,
                                    complexes) if tracked else None
                if cache is None:  # a plain dict put in by hand: its writes are not seen
                    self._batch_cache.pop(id(group), None)
                else:
                    self._batch_cache[id(group)] = cache
            plan = None
            if cache is not None and not torch.compiler.is_compiling():
                plan = cache.plan = make_plan(all_params, parts, cache, device)
            if plan is not None and not plan.gather(all_params):
                plan = cache.plan = None  # (a grad without storage: the lists, this step)
        beta1, beta2 = group["betas"]
        out = []
        for k, ((pfmt, prnd), (ps, idx, lists, scratch)) in enumerate(parts.items()):
            # grads are this step's (the cache holds params and state only)
            if plan is not None:
                gs = PlanGrads(plan, k, len(ps))
            else:
                gs = grads if len(idx) == len(grads) else [grads[i] for i in idx]
            stats = None
            if group.get("statistics"):
                # NaN until a kernel writes it: a step that found_inf skips reports NaN
                stats = torch.full((len(ps), 2), math.nan, dtype=torch.float64, device=device)
                self._pending_stats.append((ps, stats))
            if dtensors:
                # FSDP2: the kernels get the local shards, looked up every step and never cached
                # (FSDP2 may give a param a new local tensor, e.g. in load_state_dict or .to()).
                gs = [_local_grad(p, g) for p, g in zip(ps, gs)]
                ps = [_local(p) for p in ps]
            if complexes:
                # complex params: the kernels update view_as_real of param and grad (the state
                # lists hold view_as_real of the moments already). Made every step, never cached:
                # a view would not follow a param whose .data is replaced.
                gs = [_real(g) for g in gs]
                ps = [_real(p) for p in ps]
            batch = Batch(
                params=ps, grads=gs, exp_avgs=lists[0], exp_avg_sqs=lists[1],
                max_exp_avg_sqs=lists[2], steps=lists[3], lr=group["lr"],
                beta1=_as_float(beta1, "beta1"), beta2=_as_float(beta2, "beta2"),
                eps=float(group["eps"]), amsgrad=amsgrad,
                weight_decay=reference.effective_weight_decay(
                    group["weight_decay"], group["decay_mode"], group.get("lr_max")),
                maximize=bool(group["maximize"]), decoupled=bool(group["decoupled"]),
                grad_scale=grad_scale, found_inf=found_inf, device=device, scratch=scratch,
                state_format=pfmt, exp_avg_absmaxs=lists[4], exp_avg_sq_absmaxs=lists[5],
                qtables=quant.tables(device) if pfmt == "int8" else None,
                param_rounding=prnd, kahan_comps=lists[6], seed=int(group.get("seed", 0)),
                stats=stats, plan=(plan, k) if plan is not None else None,
            )
            chosen = backend
            why = backend.unsupported_reason(batch)
            if why is not None:
                if group["backend"] != "auto" or capturable_cuda:
                    # (capturable on CUDA tensors: no other backend keeps the step on the device)
                    for p in created:  # the state this call made goes (step() never sees it)
                        self.state.pop(p, None)
                    raise RuntimeError(f"onepass: backend {backend.name!r} cannot run this group: {why}"
                                       + (" (capturable=True needs it)" if capturable_cuda else ""))
                # auto: the next backend in auto's order that runs this format (the reference
                # runs every one)
                chosen = next((b for b in auto_candidates(device)
                               if b.auto_reason(device) is None and b.unsupported_reason(batch) is None),
                              BACKENDS["reference"])
            if batch.plan is not None and not chosen.takes_plan:
                batch.grads = list(batch.grads)
            out.append((chosen, batch, created if not out else []))
        if plan is not None and key is not None and not created and not group.get("statistics"):
            cache.batches, cache.batch_key = [(b, batch) for b, batch, _ in out], key
        elif cache is not None and cache.batches is not None:  # (no write while tracing)
            cache.batches = None
        return out

    @staticmethod
    def _reuse_batches(group, cache: "GroupCache", grad_scale, found_inf) -> List[Tuple[Any, Batch, list]]:
        lr = group["lr"]
        out = []
        for backend, batch in cache.batches:
            batch.lr, batch.grad_scale, batch.found_inf = lr, grad_scale, found_inf
            plan, part = batch.plan
            grads = PlanGrads(plan, part, len(batch.params))
            batch.grads = grads if backend.takes_plan else list(grads)
            out.append((backend, batch, []))
        return out

    # Runs eagerly under torch.compile (as torch.optim's _init_group does): creating state is
    # dict work dynamo cannot trace (_State's __missing__, dict.update, the int8 zero code's
    # .tolist()), and breaking inside it cost ~10 graphs and ~30 s of compiling on the first
    # step. Only a step whose cached lists are stale calls it, so later steps stay one graph.
    @torch.compiler.disable
    def _state_lists(self, params: List[Tensor], amsgrad: bool, created: list,
                     capturable: bool = False, fmt: str = "fp32", rounding: str = "nearest",
                     min_int8: int = MIN_INT8_NUMEL):
        """({(state format, rounding): (params, their indices, lists, scratch)}, tracked) of ``params``,
        creating missing state (and converting state stored in another format, e.g. after
        state_dtype changed or a torch state dict was loaded); ``tracked`` is False when some
        param's state is a plain dict put there by hand (its writes are not seen, so the lists
        must not be cached). lists: exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, the two absmax
        lists, kahan compensations."""
        parts: Dict[Tuple[str, str], tuple] = {}
        tracked = True
        state_of = self.state
        for j, p in enumerate(params):
            st = state_of[p]
            is_new = not st
            pfmt = param_state_format(p, fmt, min_int8)
            prnd = rounding if p.dtype == torch.bfloat16 else "nearest"
            if is_new:
                created.append(p)
                st["step"] = _new_step()
                st.update(_new_moments(p, pfmt))
            elif _stored_format(st) != pfmt:
                _convert_state(p, st, pfmt)
            if prnd == "kahan" and "kahan_comp" not in st:
                st["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif prnd != "kahan" and "kahan_comp" in st:
                # leaving Kahan: fold the compensation into the param (rounded once)
                p.add_(st.pop("kahan_comp"))
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
            # (a _ParamState of another optimizer's state counts its writes there)
            tracked = tracked and type(st) is _ParamState and st._epoch is getattr(state_of, "_epoch", None)
            key = (pfmt, prnd)
            if key not in parts:
                parts[key] = ([], [], ([], [], [], [], [], [], []), {})
            ps, idx, lists, _ = parts[key]
            ps.append(p)
            idx.append(j)
            # (DTensor state: its local shards; a no-op for plain tensors)
            lists[3].append(st["step"])
            # (complex params: view_as_real of their complex moments; a no-op for real ones)
            lists[0].append(_real(_local(st["exp_avg"])))
            lists[1].append(_real(_local(st["exp_avg_sq"])))
            if amsgrad:
                lists[2].append(_real(_local(st["max_exp_avg_sq"])))
            if pfmt == "int8":
                lists[4].append(_local_absmax(st["exp_avg_absmax"]))
                lists[5].append(_local_absmax(st["exp_avg_sq_absmax"]))
            if prnd == "kahan":
                lists[6].append(_local(st["kahan_comp"]))
        return parts, tracked

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. Every input is checked before any param or state is written."""
        # As torch.optim.Adam(W): refuse a CUDA graph capture that would freeze host-side values
        # (the compiler handles capture itself while tracing).
        if (_cuda_available() and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            _capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan: List[Tuple[Any, Batch]] = []
        created: list = []
        self._pending_stats: list = []
        try:
            for group in self.param_groups:
                # (traced: no memo; dynamo's view of a group differs from the eager one in
                # capturable, and a guard on the memo would recompile)
                key = _check_group(group, {} if torch.compiler.is_compiling() else self._checked)
                for item in self._group_batch(group, grad_scale, found_inf, key):
                    plan.append(item[:2])
                    created.extend(item[2])
            for backend, batch in plan:
                # A kernel checks its own batch before writing it; a step over several batches
                # checks all of them before the first write.
                if len(plan) > 1 or not backend.checks_before_writing:
                    backend.validate(batch)
            for backend, batch in plan:
                backend.step(batch)
            # For logs and the benchmark: which backends ran, in order of first use.
            self.last_backends = list(dict.fromkeys(b.name for b, _ in plan))
            self._last_stats = self._pending_stats
        except Exception:
            # A failed step leaves no new state behind. (Checks run before any batch is written,
            # so no batch has been written when one of them raises.)
            for p in created:
                self.state.pop(p, None)
            raise
        finally:
            # the plans let go of this step's grads (zero_grad(set_to_none=True) frees them)
            for _, batch in plan:
                if batch.plan is not None:
                    batch.plan[0].release()
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
            if "decay_mode" not in group and "decoupled" in group:  # saved before decay modes
                group["decay_mode"] = "decoupled" if group["decoupled"] else "coupled"
            if "param_names" in mine and "param_names" not in group:
                group["param_names"] = mine["param_names"]
            param_groups.append(group)
        for group in param_groups:
            merged = dict(group)
            for k, v in self.defaults.items():
                merged.setdefault(k, v)
            _check_group(merged)

        # State saved in another format than its group asks for (e.g. torch.optim.AdamW's fp32
        # moments into a state_dtype="int8" optimizer) is converted now, so state_dict() and the
        # memory held reflect the group's format right after loading.
        for group in param_groups:
            fmt = _state_dtype(group.get("state_dtype", self.defaults["state_dtype"]))
            mn = group.get("min_int8_numel", self.defaults["min_int8_numel"])
            for p in group["params"]:
                st = new_state.get(p)
                if st and "exp_avg" in st and "max_exp_avg_sq" not in st:
                    want = param_state_format(p, fmt, mn)
                    if _stored_format(st) != want:
                        _convert_state(p, st, want)
        state = _State()
        for p, st in new_state.items():
            state[p] = _ParamState(st)
        self.__setstate__({"state": state, "param_groups": param_groups})
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def statistics(self) -> Dict[str, Tensor]:
        """The last step's update statistics of the params of groups with ``statistics=True``:
        ``{name: tensor([‖w‖, ‖Δw‖, ‖Δw‖ / ‖w‖])}`` (float64, on the params' device; no host
        sync until you read them). ``w`` is the param as stored after the step, ``Δw`` what the
        step changed (decay included); the sums of squares come out of the update pass itself
        (reference.update_statistics), the square roots are taken here. Names are the groups'
        ``param_names`` (e.g. from :func:`onepass.param_groups`), else ``"group.index"``. NaN for
        a step that found_inf skipped; under FSDP2, the norms of each rank's local shard."""
        names = {}
        for gi, group in enumerate(self.param_groups):
            pn = group.get("param_names")
            for j, p in enumerate(group["params"]):
                names[id(p)] = pn[j] if pn else f"{gi}.{j}"
        out: Dict[str, Tensor] = {}
        for params, sums in getattr(self, "_last_stats", ()):
            norms = torch.sqrt(sums)
            table = torch.cat([norms, torch.div(norms[:, 1:], norms[:, :1])], dim=1)
            for i, p in enumerate(params):
                out[names.get(id(p), f"?{i}")] = table[i]
        return out

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
        fmt = _stored_format(st)
        if fmt != "fp32":
            # A onepass bf16/int8 state: kept in its own format (a step converts it if the group
            # asks for another), so a save/load round trip changes no bit.
            return AdamW._load_lowp_state(p, st, pid, fmt, out)
        if "kahan_comp" in st:
            out["kahan_comp"] = AdamW._load_like(p, st["kahan_comp"], p.dtype, "kahan_comp", pid)
        dt = _moment_dtype(p)
        for k in _MOMENT_KEYS:
            if k not in st:
                continue
            v = st[k]
            if p.is_complex():
                # a complex param's moments are complex (torch's and ours); a real moment would
                # load as imaginary parts of zero, a silent corruption
                if not isinstance(v, Tensor) or not v.is_complex():
                    raise ValueError(f"onepass: state {k!r} of complex param {pid!r} must be a "
                                     "complex tensor")
            elif not isinstance(v, Tensor) or not v.is_floating_point():
                raise ValueError(f"onepass: state {k!r} of param {pid!r} must be a floating-point tensor")
            if v.shape != p.shape:
                raise ValueError(
                    f"onepass: state {k!r} of param {pid!r} has shape {tuple(v.shape)}, its param "
                    f"has shape {tuple(p.shape)}"
                )
            out[k] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format).copy_(v)
        return out


    @staticmethod
    def _load_like(p: Tensor, v: Any, dtype: torch.dtype, k: str, pid: Any) -> Tensor:
        if not isinstance(v, Tensor) or v.dtype != dtype or v.shape != p.shape:
            raise ValueError(f"onepass: state {k!r} of param {pid!r} must be a {dtype} tensor of "
                             f"shape {tuple(p.shape)}")
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(v)

    @staticmethod
    def _load_lowp_state(p: Tensor, st: Dict[str, Any], pid: Any, fmt: str, out: Dict[str, Any]):
        if "max_exp_avg_sq" in st:
            raise ValueError(f"onepass: param {pid!r}: amsgrad state needs fp32 moments")
        if p.is_complex():
            raise ValueError(f"onepass: param {pid!r} is {p.dtype}; its state must be {p.dtype} "
                             f"(complex params keep full-precision moments), got {fmt} state")
        if fmt == "bf16":
            if p.dtype == torch.float64:
                raise ValueError(f"onepass: param {pid!r} is float64; its state must be float64")
            for k in ("exp_avg", "exp_avg_sq"):
                out[k] = AdamW._load_like(p, st[k], torch.bfloat16, k, pid)
        else:
            shape = tuple(reference.absmax_shape(p.shape))
            for k in ("exp_avg", "exp_avg_sq"):
                q, a = st[k], st.get(k + "_absmax")
                if not (isinstance(q, Tensor) and q.dtype == torch.uint8 and q.shape == p.shape
                        and isinstance(a, Tensor) and a.dtype == torch.float32
                        and tuple(a.shape) == shape):
                    raise ValueError(
                        f"onepass: int8 state {k!r} of param {pid!r} needs uint8 codes of shape "
                        f"{tuple(p.shape)} and a float32 {k}_absmax of shape {shape}")
                out[k] = q.to(p.device).contiguous().clone()
                out[k + "_absmax"] = a.to(p.device).contiguous().clone()
        if "kahan_comp" in st:
            out["kahan_comp"] = AdamW._load_like(p, st["kahan_comp"], p.dtype, "kahan_comp", pid)
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
        state_dtype: str = "fp32",
        param_rounding: str = "nearest",
        seed: int = 0,
        min_int8_numel: int = MIN_INT8_NUMEL,
        decay_mode: Optional[str] = None,
        lr_max: Optional[float] = None,
        statistics: bool = False,
    ):
        if decoupled is None and (decoupled_weight_decay or decay_mode is None):
            decoupled = bool(decoupled_weight_decay)
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused, backend=backend,
            decoupled=decoupled, state_dtype=state_dtype, param_rounding=param_rounding, seed=seed,
            min_int8_numel=min_int8_numel, decay_mode=decay_mode, lr_max=lr_max,
            statistics=statistics,
        )
