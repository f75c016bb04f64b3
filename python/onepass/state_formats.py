"""A param's optimizer state: the format it gets (fp32, bf16 or int8 moments), making it,
converting it between formats, decoding it for torch.optim (torch_state_dict), and checking and
converting a state dict when one is loaded (load_state), and the per-step lists of a group's
state the backends take (state_lists)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import quant, reference
from .distributed import _check_int8_placements, _is_dtensor, _local, _local_absmax, _wrap_state
from .hyperparams import MIN_INT8_NUMEL, _as_float, _check_group, _state_dtype
from .reference import math_dtype
from .state_tracking import _ParamState, _State

if TYPE_CHECKING:
    from .optimizer import AdamW

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_avg_absmax",
               "exp_avg_sq_absmax", "kahan_comp")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

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


def _zero_code(signed: bool) -> int:
    code = quant.code_table(quant.SIGNED_MAP if signed else quant.UNSIGNED_MAP, signed)
    return int((code == 0).nonzero()[0])


def _new_step() -> Tensor:
    # torch keeps a float32 0-dim CPU tensor (float64 when that is the default dtype); so do we,
    # so that state dicts move between torch.optim.AdamW and onepass unchanged.
    return torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


def torch_state_dict(optimizer: "AdamW") -> Dict[str, Any]:
    """``optimizer.state_dict()`` with every moment as a float32/float64 tensor of the param's
    shape and no onepass-only keys: loadable by torch.optim.AdamW / Adam (int8 dequantized, bf16
    widened; a Kahan compensation is dropped, so the param itself is what torch continues from).
    A ``decay_mode="lr_independent"`` group is exported as torch's decoupled decay with the
    same shrink: ``weight_decay / lr_max`` in weight_decay's place."""
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
        if g.get("decay_mode") == "lr_independent":
            # torch shrinks by lr * weight_decay: the same shrink as lr * wd / lr_max is
            # weight_decay = wd / lr_max (the float64 quotient the kernels take), and the group
            # says "decoupled" so that onepass reads it back with the meaning torch gives it
            g["weight_decay"] = reference.effective_weight_decay(g["weight_decay"], "lr_independent",
                                                                 g.get("lr_max"))
            g["decay_mode"] = "decoupled"
            g.pop("lr_max", None)
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---- loading a state dict (AdamW.load_state_dict) ----------------------------------------------
def load_param_state(p: Tensor, st: Dict[str, Any], pid: Any, amsgrad: bool) -> Dict[str, Any]:
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
    if not (step_value >= 0 and step_value == math.floor(step_value) and step_value <= 2**53):
        raise ValueError(f"onepass: the step of param {pid!r} must be a whole number in [0, 2**53], got {step!r}")
    out: Dict[str, Any] = {"step": torch.tensor(step_value, dtype=_new_step().dtype)}
    fmt = _stored_format(st)
    if fmt != "int8" and any(k + "_absmax" in st for k in ("exp_avg", "exp_avg_sq")):
        # absmaxes come with int8 codes only: int8 codes saved in another dtype, or moments
        # that lost their codes, would otherwise load as fp32 moments of code values
        fmt = "int8"
    if fmt != "fp32":
        # A onepass bf16/int8 state: kept in its own format (a step converts it if the group
        # asks for another), so a save/load round trip changes no bit.
        return _load_lowp_state(p, st, pid, fmt, out)
    if "kahan_comp" in st:
        out["kahan_comp"] = _load_like(p, st["kahan_comp"], p.dtype, "kahan_comp", pid)
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


def _load_like(p: Tensor, v: Any, dtype: torch.dtype, k: str, pid: Any) -> Tensor:
    if not isinstance(v, Tensor) or v.dtype != dtype or v.shape != p.shape:
        raise ValueError(f"onepass: state {k!r} of param {pid!r} must be a {dtype} tensor of "
                         f"shape {tuple(p.shape)}")
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(v)

def _kind(v: Any) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__


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
            out[k] = _load_like(p, st[k], torch.bfloat16, k, pid)
    else:
        shape = tuple(reference.absmax_shape(p.shape))
        for k in ("exp_avg", "exp_avg_sq"):
            q, a = st[k], st.get(k + "_absmax")
            if not (isinstance(q, Tensor) and q.dtype == torch.uint8 and q.shape == p.shape
                    and isinstance(a, Tensor) and a.dtype == torch.float32
                    and tuple(a.shape) == shape):
                raise ValueError(
                    f"onepass: int8 state {k!r} of param {pid!r} needs uint8 codes of shape "
                    f"{tuple(p.shape)} and a float32 {k}_absmax of shape {shape}, got "
                    f"{_kind(q)} and {_kind(a)}")
            if not bool(((a >= 0) & torch.isfinite(a)).all()):
                # (a block's scale: negative or NaN, every code of the block decodes to garbage)
                raise ValueError(f"onepass: int8 state {k + '_absmax'!r} of param {pid!r} must be "
                                 "finite and >= 0 (the scale of each block of 256)")
            out[k] = q.to(p.device).contiguous().clone()
            out[k + "_absmax"] = a.to(p.device).contiguous().clone()
    if "kahan_comp" in st:
        out["kahan_comp"] = _load_like(p, st["kahan_comp"], p.dtype, "kahan_comp", pid)
    return out


#: Group settings a loaded state dict does not replace (load_state).
_RUN_SETTINGS = ("backend", "state_dtype", "min_int8_numel")


def load_state(optimizer: "AdamW", state_dict: Dict[str, Any]):
    """(state, param_groups) for ``optimizer`` from a onepass or torch.optim.Adam(W) state dict,
    everything checked first (group and param counts, state keys, moment shapes, step counts)
    and the moments converted to each group's state format; the optimizer is not changed."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("onepass: a state dict needs the keys 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if not isinstance(state_dict["state"], dict):
        raise ValueError("onepass: a state dict's 'state' must be a dict from param ids to "
                         f"param states, got {type(state_dict['state']).__name__}")
    if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups):
        raise ValueError("onepass: a state dict's 'param_groups' must be a list of dicts, each "
                         "with a 'params' list of param ids")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"onepass: the state dict has {len(saved_groups)} param groups, this optimizer "
            f"has {len(optimizer.param_groups)}"
        )
    id_map: Dict[Any, Tensor] = {}
    for gi, (mine, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if len(mine["params"]) != len(saved["params"]):
            raise ValueError(
                f"onepass: param group {gi} has {len(saved['params'])} params in the state "
                f"dict and {len(mine['params'])} here"
            )
        for pid, p in zip(saved["params"], mine["params"]):
            id_map[pid] = p
    amsgrad_of = {}
    for mine, saved in zip(optimizer.param_groups, saved_groups):
        for pid in saved["params"]:
            amsgrad_of[pid] = bool(saved.get("amsgrad", mine["amsgrad"]))

    new_state: Dict[Tensor, Dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        if pid not in id_map:
            raise ValueError(f"onepass: the state dict has state for param {pid!r}, which no group lists")
        p = id_map[pid]
        new_state[p] = load_param_state(p, st, pid, amsgrad_of[pid])

    param_groups = []
    for mine, saved in zip(optimizer.param_groups, saved_groups):
        group = dict(saved)
        group["params"] = mine["params"]
        if "decay_mode" not in group and "decoupled" in group:  # saved before decay modes
            group["decay_mode"] = "decoupled" if group["decoupled"] else "coupled"
        if "param_names" in mine and "param_names" not in group:
            group["param_names"] = mine["param_names"]
        # Saved settings win, as in torch, except where this run keeps its state and runs its
        # kernels: the backend is where to run, not what was learned, and the state format is
        # this run's memory budget (the saved moments are converted to it below).
        for k in _RUN_SETTINGS:
            if k in mine:
                group[k] = mine[k]
        param_groups.append(group)
    for group in param_groups:
        merged = dict(group)
        for k, v in optimizer.defaults.items():
            merged.setdefault(k, v)
        if merged["decay_mode"] == "lr_independent" and merged.get("lr_max") is None:
            # a torch checkpoint has no peak lr: its start (a scheduler's initial_lr), else its
            # lr, as add_param_group takes a new group's lr
            group["lr_max"] = merged["lr_max"] = _as_float(merged.get("initial_lr", merged["lr"]), "lr")
        _check_group(merged)

    # State saved in another format than its group asks for (e.g. torch.optim.AdamW's fp32
    # moments into a state_dtype="int8" optimizer) is converted now, so state_dict() and the
    # memory held reflect the group's format right after loading.
    for group in param_groups:
        fmt = _state_dtype(group.get("state_dtype", optimizer.defaults["state_dtype"]))
        mn = group.get("min_int8_numel", optimizer.defaults["min_int8_numel"])
        for p in group["params"]:
            st = new_state.get(p)
            if st and "exp_avg" in st and "max_exp_avg_sq" not in st:
                want = param_state_format(p, fmt, mn)
                if _stored_format(st) != want:
                    _convert_state(p, st, want)
    state = _State()
    for p, st in new_state.items():
        state[p] = _ParamState(st)
    return state, param_groups


# ---- the state lists of a step (AdamW._state_lists) ---------------------------------------------
def _save(undo: list, st: Dict[str, Any], saved: bool) -> bool:
    """Puts st's entries in ``undo`` before its first change of this step (state_lists)."""
    if not saved:
        undo.append((st, dict(st)))
    return True


def _follow_layout(p: Tensor, st: Dict[str, Any], undo: list, saved: bool) -> bool:
    """Moves a param's moments to its memory layout when the param's changed (e.g.
    ``model.to(memory_format=torch.channels_last)`` after the state was made): the kernels walk
    state and param in storage order, and the values follow the elements, as torch's state
    does. New tensors, so a step that raises can take the old ones back (``undo``)."""
    if _is_dtensor(p) or p.is_complex():  # (their state lists hold local shards / real views)
        return saved
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "kahan_comp"):
        v = st.get(k)
        if isinstance(v, Tensor) and v.shape == p.shape:
            # (preserve_format: the layout new state gets, _new_moments' zeros_like)
            want = torch.empty_like(p, dtype=v.dtype, memory_format=torch.preserve_format)
            if v.stride() != want.stride():
                saved = _save(undo, st, saved)
                st[k] = want.copy_(v)
    return saved


def state_lists(state_of, params: List[Tensor], amsgrad: bool, created: list,
                capturable: bool = False, fmt: str = "fp32", rounding: str = "nearest",
                min_int8: int = MIN_INT8_NUMEL, undo: Optional[list] = None,
                folds: Optional[list] = None):
    """({(state format, rounding): (params, their indices, lists, scratch)}, tracked) of ``params``
    in ``state_of`` (an optimizer's state), creating missing state (and converting state stored in another format, e.g. after
    state_dtype changed or a torch state dict was loaded); ``tracked`` is False when some
    param's state is a plain dict put there by hand (its writes are not seen, so the lists
    must not be cached). lists: exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, the two absmax
    lists, kahan compensations.

    Nothing here writes a param or an existing state tensor, so a step that raises later (a
    malformed grad of another param) can take everything back: an existing param state about
    to change (a format conversion, a Kahan buffer added or dropped, a count moved to the
    device, moments moved to the param's new memory layout) is first saved to ``undo`` as
    ``(state, its entries)`` (each change puts new tensors in, the old ones stay as they
    were), and leaving Kahan rounding puts ``(param, compensation)`` in ``folds``, for the
    optimizer to add once every check passed (AdamW.step)."""
    parts: Dict[Tuple[str, str], tuple] = {}
    tracked = True
    undo = [] if undo is None else undo
    folds = [] if folds is None else folds
    for j, p in enumerate(params):
        st = state_of[p]
        is_new = not st
        pfmt = param_state_format(p, fmt, min_int8)
        prnd = rounding if p.dtype == torch.bfloat16 else "nearest"
        saved = is_new
        if is_new:
            created.append(p)
            st["step"] = _new_step()
            st.update(_new_moments(p, pfmt))
        elif _stored_format(st) != pfmt:
            saved = _save(undo, st, saved)
            _convert_state(p, st, pfmt)
        if prnd == "kahan" and "kahan_comp" not in st:
            saved = _save(undo, st, saved)
            st["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif prnd != "kahan" and "kahan_comp" in st:
            # leaving Kahan: the compensation is folded into the param (rounded once), after
            # the step's checks
            saved = _save(undo, st, saved)
            folds.append((p, st.pop("kahan_comp")))
        if not is_new and pfmt != "int8" and st["exp_avg"].stride() != p.stride():
            saved = _follow_layout(p, st, undo, saved)
        if capturable and p.is_cuda and not st["step"].is_cuda:
            saved = _save(undo, st, saved)
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
