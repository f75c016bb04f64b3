"""The backend interface (ARCHITECTURE.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
from torch import Tensor


@dataclass
class Batch:
    """The tensors of one group on one device with one param dtype, and the group's settings.

    ``steps`` are the 0-dim step-count tensors of each param's state; a backend increments them
    and derives the per-step scalars from them with the one float64 function
    (``reference.step_scalars`` / ``csrc/adam_math.h: make_step_scalars``), so params whose counts
    differ (e.g. after loading a partial state) still get their own bias corrections.
    """

    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    max_exp_avg_sqs: List[Tensor]
    steps: List[Tensor]
    lr: Union[float, Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Low precision (reference.py, "Storage"). ``state_format``: "fp32" (moments in the math
    #: dtype), "bf16" (bf16 moments, stochastic rounding) or "int8" (uint8 codes in exp_avgs /
    #: exp_avg_sqs plus float32 absmax lists ``exp_avg_absmaxs`` / ``exp_avg_sq_absmaxs`` of
    #: shape reference.absmax_shape(param.shape); ``qtables`` = quant.tables(device)).
    #: ``param_rounding``: "nearest", or for bf16 params "stochastic" / "kahan" (with the bf16
    #: ``kahan_comps``). ``seed`` keys the random streams. amsgrad only with "fp32".
    state_format: str = "fp32"
    exp_avg_absmaxs: List[Tensor] = field(default_factory=list)
    exp_avg_sq_absmaxs: List[Tensor] = field(default_factory=list)
    qtables: Optional[Tensor] = None
    param_rounding: str = "nearest"
    kahan_comps: List[Tensor] = field(default_factory=list)
    seed: int = 0
    #: Fused statistics (reference.update_statistics): a float64 [len(params), 2] tensor that the
    #: step fills with each param's (sum of w**2, sum of dw**2); left as it is on a skipped step.
    stats: Optional[Tensor] = None
    #: A dict that lives as long as the state lists above stay the same objects (the optimizer's
    #: per-group cache): a backend may keep what it derives from them here (tables, pointers).
    #: Fresh and empty whenever the lists were rebuilt.
    scratch: dict = field(default_factory=dict)
    #: (onepass._C.GroupPlan, part) when the optimizer's cached plan holds this batch's tensors
    #: (csrc/group_plan.h): a backend with ``takes_plan`` may step the part through it, with the
    #: grads the plan read in C++, instead of passing the lists above. None otherwise.
    plan: Optional[tuple] = None
    #: The optimizer's list of what its later steps must settle first (None outside an
    #: optimizer): a backend that leaves found_inf to its kernels, without a host sync, and
    #: advanced host step counts that the skip would have left, appends a callable that reads
    #: found_inf once it is there and puts the counts back (SkippedCounts). The optimizer
    #: calls them before its next step, state_dict(), load_state_dict() and pickling.
    deferred: Optional[list] = None
    #: (the optimizer's group, the group's params of this batch, in batch order): whom a fault
    #: at a batch position is about (param_names.name_fault). None outside an optimizer.
    origin: Optional[tuple] = None


class SkippedCounts:
    """Batch.deferred's entry of a step under a GradScaler whose kernels read found_inf on the
    device while its host counts advanced (triton; cuda with host counts): found_inf copied to
    the host behind the step's launches (pinned, non-blocking, with an event on a GPU), and the
    counts the step advanced. Called at the optimizer's next settle: waits for the event (by then
    normally long passed: one step old), and takes the counts back by one if the step was
    skipped (exact below 2**24; a float32 count that reached 2**24 stays there, as torch's does,
    and a skip then takes it to 2**24 - 1, where every bias correction is 1 to within 5e-8)."""

    __slots__ = ("flag", "event", "steps")

    def __init__(self, found_inf: torch.Tensor, steps: List[torch.Tensor]):
        first = found_inf.detach().reshape(-1)[:1]
        if first.device.type == "cuda":
            self.flag = torch.empty(1, dtype=first.dtype, pin_memory=True)
            self.flag.copy_(first, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag, self.event = first.clone(), None
        self.steps = steps

    def __call__(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        if bool(self.flag[0] != 0):
            torch._foreach_add_(self.steps, -1.0)


def defers_found_inf(batch: Batch) -> bool:
    """Whether a step of ``batch`` leaves found_inf to its kernels and its host counts to a
    SkippedCounts: under an optimizer (Batch.deferred), with host step counts and a found_inf on
    the params' device (a host found_inf is read at no cost)."""
    fi = batch.found_inf
    return (fi is not None and batch.deferred is not None and fi.device == batch.device
            and bool(batch.steps) and batch.steps[0].device.type == "cpu")


def plan_step_kwargs(batch: Batch) -> dict:
    """The per-step arguments of a step through the optimizer's plan (GroupPlan.step and the
    CUDA / emulated modules' step_plan): the settings and scalars of the batch, its tensors
    being in the plan already."""
    lr = batch.lr
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return dict(lr=0.0 if lr_tensor is not None else float(lr), lr_tensor=lr_tensor,
                beta1=batch.beta1, beta2=batch.beta2, eps=batch.eps,
                weight_decay=batch.weight_decay, maximize=batch.maximize,
                decoupled=batch.decoupled, grad_scale=batch.grad_scale,
                found_inf=batch.found_inf, seed=int(batch.seed))


class Backend:
    name: str = "?"
    #: True when ``step`` itself checks the whole batch before writing anything, so a step with a
    #: single batch needs no separate ``validate`` call.
    checks_before_writing: bool = False
    #: True when ``step`` and ``validate`` use Batch.plan where it is set; the optimizer gives
    #: other backends the plan's grads as a list.
    takes_plan: bool = False

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when this backend can run tensors on ``device``; else why it cannot."""
        raise NotImplementedError

    #: The state formats and param roundings this backend's kernels implement.
    state_formats: tuple = ("fp32",)
    param_roundings: tuple = ("nearest",)

    #: Whether the kernels compute the fused statistics (Batch.stats).
    statistics: bool = False

    def unsupported_reason(self, batch: "Batch") -> Optional[str]:
        """None when this backend implements the batch's state format and param rounding."""
        if batch.stats is not None and not self.statistics:
            return f"the {self.name} backend has no fused statistics yet"
        if batch.state_format not in self.state_formats:
            return f"the {self.name} backend has no {batch.state_format} state yet"
        if batch.param_rounding not in self.param_roundings:
            return f"the {self.name} backend has no {batch.param_rounding} param rounding yet"
        return None

    def auto_reason(self, device: torch.device) -> Optional[str]:
        """Like ``unavailable_reason``, for backend="auto" and listings: never starts a build."""
        return self.unavailable_reason(device)

    def validate(self, batch: Batch) -> None:
        """Raise a clear error for anything ``step`` cannot do; never write anything."""
        raise NotImplementedError

    def step(self, batch: Batch) -> None:
        """Update the batch in place (params, moments, step counts)."""
        raise NotImplementedError
