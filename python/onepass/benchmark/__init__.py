"""Optimizer-step benchmark: onepass.AdamW against torch's AdamW variants and its peers.

This package is the one definition of the benchmark cases, contestants, byte accounting and accuracy
protocol (ARCHITECTURE.md section 5). ``python -m onepass`` and the pytest-benchmark files under
``bench/`` both use it, so a case means the same thing everywhere.

It imports only the standard library and torch at module level. ``onepass.AdamW`` and every peer
(optimi, bitsandbytes, torchao, matplotlib, tqdm) are imported lazily inside the function that needs
them, and a contestant that cannot be imported or cannot take a step is *skipped with a reason*, never
an error: the benchmark must run on a machine that has none of the peers.

What is measured
----------------
* **Speed.** Every contestant steps the **same** parameter and gradient tensors (each optimizer keeps
  its own state), so all of them see identical shapes, dtypes, alignment and memory placement, and
  the parameters are only allocated once (gpt2 is 0.5 GB of params plus 0.5 GB of grads in fp32).
  After a warm-up (which creates the lazily allocated state and, for torchao, compiles), the
  contestants and the bandwidth ceiling take turns: one step each per round, in an order rotated
  every round, so clock, thermal and neighbour drift hit all of them alike. The figure reported is
  the median over rounds. A contestant whose warm-up steps say that ``rounds`` steps would exceed
  the time budget (``budget_s``, per contestant and case) takes part in fewer rounds, at least
  ``min_rounds``, spread evenly over the run; the table says how many each got. Warm-up steps
  (the first one includes torch.compile for torchao) are timed and reported apart, never in the
  median.
* **Effective bandwidth** = bytes an AdamW step must move / time. For each parameter element: read
  param, grad and the state, write param and state. With fp32 params and fp32 state that is
  4 + 4 + 8 (read) + 4 + 8 (write) = 28 bytes. The ceiling is measured in the same run: on CPU an
  in-place ``x.mul_(c)`` on a float32 buffer four times the case's element count (read + write,
  large enough to leave the caches, like the step's four streams), on GPU a device-to-device
  ``dst.copy_(src)``.
* **Memory.** State bytes per param are measured from each optimizer's own state after warm-up
  (``state_nbytes``): every tensor reachable from ``optimizer.state``, tensor subclasses (torchao's
  low-bit state) counted through their inner tensors, quantization maps and absmax tensors
  (bitsandbytes, onepass int8) included, each buffer once.
* **Accuracy** (``accuracy``): each contestant and ``torch.optim.AdamW`` with fp32 state step
  identical fp32 params with identical gradients for ``ACCURACY_STEPS`` steps; reported are the max
  and the norm-wise relative error of the accumulated update (params after minus params before).
  The gradients are built to find the failure of blockwise 8-bit state: within every 256-element
  block their magnitudes span ``ACCURACY_DECADES`` decades, and a quarter of them are exactly zero
  at each step (see ``accuracy_grads``).
"""
from __future__ import annotations

from .cases import (ACCURACY_DECADES, ACCURACY_SHAPES, ACCURACY_STEPS, ACCURACY_ZERO_FRACTION,
                    BETAS, CASES, DEFAULT_CASES, EPS, GPT2_PARAMS, GPT2_TENSORS, LR, WEIGHT_DECAY,
                    case_shapes, check_gpt2_counts, count_params, gpt2, huge, make_params,
                    parse_dtype, small)
from .contestants import (CONTESTANTS, Contestant, DEFAULT_CONTESTANTS, REFERENCE_CONTESTANT,
                          _quiet_import, available_contestants, make_factory)
from .accounting import bytes_moved, bytes_per_param, state_nbytes, state_tensors
from .accuracy import (_reference_factory, accumulated_update, accuracy, accuracy_grads,
                       measure_accuracy)
from .timing import Ceiling, Timer, _NoBar, _takes_part, make_ceiling, plan_rounds, progress_bar
from .run import DEFAULT_BUDGET_S, DEFAULT_MIN_ROUNDS, derive, run_benchmark, run_case
from .machine import cpu_busy, machine_info
from .report import format_table, plot

# (_reference_factory, _quiet_import, _NoBar and _takes_part: for the tests and bench/)
__all__ = [
    "LR",
    "WEIGHT_DECAY",
    "BETAS",
    "EPS",
    "GPT2_TENSORS",
    "GPT2_PARAMS",
    "CASES",
    "DEFAULT_CASES",
    "CONTESTANTS",
    "DEFAULT_CONTESTANTS",
    "REFERENCE_CONTESTANT",
    "Contestant",
    "Ceiling",
    "make_ceiling",
    "gpt2",
    "small",
    "huge",
    "check_gpt2_counts",
    "case_shapes",
    "count_params",
    "parse_dtype",
    "make_params",
    "make_factory",
    "available_contestants",
    "bytes_per_param",
    "state_nbytes",
    "state_tensors",
    "bytes_moved",
    "ACCURACY_SHAPES",
    "ACCURACY_STEPS",
    "ACCURACY_DECADES",
    "ACCURACY_ZERO_FRACTION",
    "accuracy_grads",
    "accumulated_update",
    "accuracy",
    "measure_accuracy",
    "plan_rounds",
    "machine_info",
    "cpu_busy",
    "run_case",
    "run_benchmark",
    "DEFAULT_BUDGET_S",
    "DEFAULT_MIN_ROUNDS",
    "derive",
    "format_table",
    "plot",
    "progress_bar",
    "Timer",
    "_reference_factory",
    "_quiet_import",
    "_NoBar",
    "_takes_part",
]
