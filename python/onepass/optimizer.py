"""onepass.AdamW and onepass.Adam: drop-in torch.optim optimizers over onepass's backends.

The optimizer groups params by (device, param dtype), lazily creates their state, checks every
input before anything is written, and hands each batch to its backend. The arithmetic lives in
reference.py (and its C++ twin); nothing here computes an update. A step: the group's settings
checked (hyperparams.py), its state lists and C++ plan reused while valid (_plan.py, the write
counters of state_tracking.py) or made (state_formats.py; distributed.py for DTensor params), then
every batch checked and run by its backend (backends/).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import quant, reference
from ._plan import GroupCache, PlanGrads, make_plan
from .backends import BACKENDS, Batch, auto_candidates
from .backends import group_backend as _group_backend
from .reference import PARAM_DTYPES
from .capture import _capture_health_check, _cuda_available
from .distributed import _dtensor_type, _is_dtensor, _local, _local_grad
from .param_names import name_fault
from .param_overlap import check_disjoint
from .hyperparams import (MIN_INT8_NUMEL, _as_float, _check_group, _check_hyperparameters,
                          _check_rounding_dtypes, _resolve_decay_mode, _state_dtype)
from .state_formats import COMPLEX_DTYPES, _real, load_state, state_lists, torch_state_dict
from .state_tracking import _State, _epoch_of, _tracked, settle

__all__ = ["AdamW", "Adam", "torch_state_dict"]






def _lists_stale(parts) -> bool:
    """Whether a param of the cached lists no longer fits its moments: ``.data`` of another
    memory layout (model.to(memory_format=torch.channels_last): state_lists moves them; int8
    codes stay contiguous whatever the layout), dtype (a float64 param no longer takes bf16 or
    int8 state, and its fp32 moments no longer fit) or shape. The lists and what the backends
    derived from them (scratch: the triton backend checks moments once per scratch) are then
    made again, from the state, and checked."""
    for (fmt, _), (ps, _, lists, _) in parts.items():
        for p, m in zip(ps, lists[0]):
            mdt = reference.math_dtype(p.dtype)  # (not `math`: the module of that name)
            if (m.shape != p.shape or (m.dtype != mdt if fmt == "fp32" else mdt != torch.float32)
                    or (fmt != "int8" and m.stride() != p.stride())):
                return True
    return False


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
        self._deferred: list = []  # Batch.deferred: settled by _settle
        _cuda_available()  # asked once, here, not while a step is traced or captured
        super().__init__(params, defaults)
        self.state = _State()
        self.state._deferred = self._deferred
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
        self._settle()
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
        self.__dict__.setdefault("_deferred", [])  # (settled before any load: see _settle)
        self.state._deferred = self._deferred
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
            positions = range(len(all_params))
            if any(g is None for g in grads):
                positions = [j for j, g in enumerate(grads) if g is not None]
                params = [all_params[j] for j in positions]
                grads = [grads[j] for j in positions]
            if not params:
                return []
            # (the plan holds only lists that passed this: a changed list or param storage
            # makes its gather refuse, and the step comes here; not traced, since dynamo
            # cannot trace data_ptr(), and an eager step checks the same lists)
            if not torch.compiler.is_compiling():
                check_disjoint(next(i for i, g in enumerate(self.param_groups) if g is group),
                               group, positions)
            # The state lists of a group are cached between steps: looking up 2000 params' state
            # costs ~2 ms of Python per step. Valid while the same params have grads and no
            # state dict was written (the state's write counter, _State._epoch).
            _check_rounding_dtypes(params, rounding)
            ids = [id(p) for p in params]
            # The cached lists, and what a backend derived from them (scratch), are reused only
            # while a plan guards them and has not seen a state tensor move in place (`.data =`,
            # set_, resize_, share_memory_(): plan.moved()). Groups without a plan (no
            # extension, DTensor or complex params, whose lists hold views) rebuild them; a
            # traced step keeps them (dynamo guards what it traced, and no plan is made there).
            guarded = fresh and (torch.compiler.is_compiling()
                                 or (cache.plan is not None and not cache.plan.moved()))
            if guarded and cache.ids == ids and not _lists_stale(cache.parts):
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
            origin = (group, ps)
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
                deferred=self._deferred,
                state_format=pfmt, exp_avg_absmaxs=lists[4], exp_avg_sq_absmaxs=lists[5],
                qtables=quant.tables(device) if pfmt == "int8" else None,
                param_rounding=prnd, kahan_comps=lists[6], seed=int(group.get("seed", 0)),
                stats=stats, plan=(plan, k) if plan is not None else None, origin=origin,
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
        """state_formats.state_lists of this optimizer's state."""
        return state_lists(self.state, params, amsgrad, created, capturable, fmt, rounding, min_int8,
                           self._undo, self._folds)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step. Every input is checked before any param or state is written."""
        # As torch.optim.Adam(W): refuse a CUDA graph capture that would freeze host-side values
        # (the compiler handles capture itself while tracing).
        if (_cuda_available() and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            _capture_health_check(self)
        if self._deferred:
            self._settle()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan: List[Tuple[Any, Batch]] = []
        created: list = []
        self._pending_stats: list = []
        # state_lists' record of this step's changes to existing state, and the Kahan folds it
        # leaves until every check passed (a raising step leaves params and state as they were)
        self._undo: list = []
        self._folds: list = []
        current = None  # the batch being checked or run
        try:
            for group in self.param_groups:
                # (traced: no memo; dynamo's view of a group differs from the eager one in
                # capturable, and a guard on the memo would recompile)
                key = _check_group(group, {} if torch.compiler.is_compiling() else self._checked)
                for item in self._group_batch(group, grad_scale, found_inf, key):
                    plan.append(item[:2])
                    created.extend(item[2])
            for backend, batch in plan:
                # A kernel checks its own batch before writing it; a step over several batches,
                # or one that folds a Kahan compensation first, checks all of them before then.
                if len(plan) > 1 or not backend.checks_before_writing or self._folds:
                    current = batch
                    backend.validate(batch)
            for p, comp in self._folds:
                p.add_(comp)
            for backend, batch in plan:
                current = batch
                backend.step(batch)
            # For logs and the benchmark: which backends ran, in order of first use.
            self.last_backends = list(dict.fromkeys(b.name for b, _ in plan))
            self._last_stats = self._pending_stats
        except Exception as e:
            if current is not None and current.origin is not None:
                group, ps = current.origin
                gi = next((i for i, g in enumerate(self.param_groups) if g is group), None)
                if gi is not None:
                    name_fault(e, gi, group, ps)
            # A failed step leaves no new state behind and the old as it was. (Checks run before
            # any batch or fold is written, so nothing has been written when one of them raises.)
            for p in created:
                self.state.pop(p, None)
            for st, entries in reversed(self._undo):
                st.clear()
                st.update(entries)
            raise
        finally:
            self._undo, self._folds = [], []  # (the old tensors go)
            # the plans let go of this step's grads (zero_grad(set_to_none=True) frees them)
            for _, batch in plan:
                if batch.plan is not None:
                    batch.plan[0].release()
        return loss

    @torch.compiler.disable
    def _settle(self) -> None:
        """Runs what earlier steps left to settle (Batch.deferred), oldest first: a triton step
        under a GradScaler advances its host counts before the kernels read found_inf, and this
        puts them back when found_inf says the step was skipped (one wait for an event of the
        last step, not a sync of this one). Steps, state_dict(), load_state_dict(), pickling
        and reads of ``state`` (_State) settle first."""
        settle(self.__dict__.get("_deferred"))

    # ---- state dict ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a onepass or torch.optim.Adam(W) state dict; all or nothing.

        Everything is checked before the optimizer changes: group and param counts, state keys,
        moment shapes, step counts. Moments are copied into this optimizer's own tensors in the
        math dtype (float32 for bf16/fp16 params, so an fp32 state is never rounded on load) and
        in the param's memory layout.

        The saved group settings win, as in torch (lr, betas, weight_decay, ...), except
        ``backend``, ``state_dtype`` and ``min_int8_numel``: this optimizer's, since they say
        where this run computes and how it stores its state, not what was learned. Saved moments
        in another format are converted to this optimizer's (an fp32 checkpoint into
        ``state_dtype="int8"`` is quantized on load; an int8 one into fp32 is dequantized). A
        torch checkpoint loaded into a ``decay_mode="lr_independent"`` optimizer takes each
        group's ``lr_max`` from the constructor's ``lr_max`` if one was given, else from the group's
        ``initial_lr`` (set by torch's lr schedulers), else from its lr.
        """
        self._settle()
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        state, param_groups = load_state(self, state_dict)
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
        self._settle()
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
        return sd


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
