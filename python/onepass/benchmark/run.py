"""Running a case (contestants and ceiling interleaved round by round) and the whole benchmark."""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Iterable, Sequence

import torch

from .accounting import bytes_moved, state_nbytes
from .accuracy import measure_accuracy
from .cases import ACCURACY_DECADES, ACCURACY_SHAPES, ACCURACY_STEPS, ACCURACY_ZERO_FRACTION
from .cases import (CASES, DEFAULT_CASES, Factory, LR, Shape, WEIGHT_DECAY, _dtype_name,
                    case_shapes, count_params, make_params, parse_dtype)
from .contestants import (CONTESTANTS, DEFAULT_CONTESTANTS, REFERENCE_CONTESTANT, _onepass_backend,
                          _reason, available_contestants)
from .machine import _OtherLoad, cpu_busy, machine_info
from .timing import Timer, _free, _sync, _takes_part, make_ceiling, plan_rounds, progress_bar


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def run_case(name: str, shapes: Sequence[Shape], factories: dict[str, Factory],
             device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
             rounds: int = 10, warmup: int = 2, skipped: dict[str, str] | None = None,
             slow_limit: int | None = None, progress: bool | None = False,
             seed: int = 0, budget_s: float | None = None, min_rounds: int = 3) -> dict[str, Any]:
    """Time one case. Returns a JSON-serialisable dict (see ``derive`` for the derived fields).

    ``factories`` maps contestant name -> factory(params); all share one set of params/grads.
    Each contestant takes ``warmup`` timed warm-up steps (kept apart: ``warmup_ms``), then up to
    ``rounds`` interleaved rounds: ``plan_rounds`` gives a contestant fewer (at least
    ``min_rounds``) when its steps (the faster of its second warm-up step and the median of its
    timed steps so far, re-planned each round) say ``rounds`` steps would exceed ``budget_s``
    seconds, spread evenly over the rounds. Contestants flagged slow are skipped when the case has
    more than ``slow_limit`` params. A contestant that raises during the run (e.g. out of memory) is
    dropped and listed in ``errors`` instead of aborting the whole benchmark. ``progress``: a tqdm
    bar (None: when stderr is a terminal)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if min_rounds < 1:
        raise ValueError(f"min_rounds must be >= 1, got {min_rounds}")
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    skipped = dict(skipped or {})
    errors: dict[str, str] = {}
    n_params = count_params(shapes)

    names = []
    for n in factories:
        c = CONTESTANTS.get(n)
        if c is not None and c.slow and slow_limit is not None and n_params > slow_limit:
            skipped[n] = f"slow, excluded above {slow_limit:,} params"
        else:
            names.append(n)

    params = make_params(shapes, device, dtype, seed=seed)
    ceiling = make_ceiling(device, n_params)
    timer = Timer(device)
    opts: dict[str, torch.optim.Optimizer] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    warm_times: dict[str, list[float]] = {n: [] for n in names}
    planned: dict[str, int] = {}
    estimates: dict[str, float | None] = {}
    ceil_times: list[float] = []
    bar = progress_bar(len(names) * (warmup + rounds) + rounds, name, progress)

    def fail(n: str, e: BaseException) -> None:
        # Called inside the except block; the memory (e.g. after an OOM) is released by _free once
        # the exception and its traceback are gone.
        errors[n] = _reason(e)
        opts.pop(n, None)
        times.pop(n, None)

    try:
        # Warm-up: builds each optimizer and its state (the first step allocates and page-faults
        # it; torchao's compiles). Timed, to plan the rounds and to report the first step apart.
        for n in names:
            try:
                opts[n] = factories[n](params)
                for _ in range(warmup):
                    bar.set_postfix_str(f"{n} (warm-up)")
                    warm_times[n].append(timer(opts[n].step))
                    bar.update(1)
                _sync(device)
            except Exception as e:  # noqa: BLE001 - drop this contestant, keep the others
                fail(n, e)
            if n in errors:
                _free(device)
                continue
            w = warm_times[n]
            estimates[n] = min(w[1:]) if len(w) > 1 else (w[0] if w else None)
            planned[n] = plan_rounds(estimates[n], rounds, budget_s, min_rounds)
        bar.total = len(names) * warmup + sum(planned.values()) + rounds
        bar.refresh()
        for _ in range(max(1, warmup)):
            ceiling.fn()
        _sync(device)

        # Rounds: every contestant (that takes part in this round) and the ceiling once per round,
        # rotating the order.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one contestant's timing would be noise charged to it
        try:
            for r in range(rounds):
                # Re-plan with the steps timed so far: a second warm-up step can still be slow
                # (first touches), and the plan only ever grows.
                for n in opts:
                    if times[n] and estimates[n] is not None:
                        estimates[n] = min(estimates[n], statistics.median(times[n]))
                        planned[n] = max(planned[n], plan_rounds(estimates[n], rounds, budget_s,
                                                                 min_rounds))
                bar.total = len(names) * warmup + sum(planned.values()) + rounds
                order = ["<ceiling>"] + list(opts)
                k = r % len(order)
                for n in order[k:] + order[:k]:
                    if n == "<ceiling>":
                        bar.set_postfix_str("ceiling")
                        ceil_times.append(timer(ceiling.fn))
                    elif n in opts and _takes_part(r, planned[n], rounds):
                        bar.set_postfix_str(n)
                        try:
                            times[n].append(timer(opts[n].step))
                        except Exception as e:  # noqa: BLE001
                            fail(n, e)
                        if n in errors:
                            _free(device)
                    else:
                        continue
                    bar.update(1)
        finally:
            if gc_was_enabled:
                gc.enable()

        contestants = []
        for n, opt in opts.items():
            sb = state_nbytes(opt)
            ts = times[n]
            entry = {
                "name": n,
                "ms": statistics.median(ts),
                "ms_min": min(ts),
                "ms_all": ts,
                "rounds": len(ts),
                "warmup_ms": warm_times[n],
                "state_bytes": sb,
                # 0 means the optimizer keeps its state outside optimizer.state: assume torch's
                # layout (two state tensors in the param dtype) rather than report nonsense.
                "state_bytes_source": "measured" if sb > 0 else "assumed",
                "bytes_per_step": bytes_moved(params, sb if sb > 0 else None),
            }
            used = getattr(opt, "last_backends", None)  # what onepass's last step ran on
            backend = "+".join(used) if used else _onepass_backend(n, device)
            if backend is not None:
                entry["backend"] = backend
            contestants.append(entry)
        ceiling_ms = statistics.median(ceil_times) if ceil_times else float("nan")
        result = {
            "case": name,
            "n_tensors": len(shapes),
            "n_params": n_params,
            "dtype": _dtype_name(dtype),
            "rounds": rounds,
            "min_rounds": min_rounds,
            "budget_s": budget_s,
            "warmup": warmup,
            "ceiling": {"kind": ceiling.kind, "bytes": ceiling.bytes, "ms": ceiling_ms,
                        "ms_all": ceil_times},
            "contestants": contestants,
            "skipped": skipped,
            "errors": errors,
        }
    finally:
        bar.close()
        opts.clear()
        del params, ceiling
        _free(device)
    return derive(result)


def derive(case: dict[str, Any]) -> dict[str, Any]:
    """Fill in the derived figures of a case result (in place, also returned):

    * ``gbps``  = bytes_per_step / time, for each contestant and for the ceiling
    * ``frac_ceiling`` = gbps / ceiling gbps
    * ``x_torch_fused`` = time(torch-fused) / time(contestant): > 1 means faster than torch fused
      (None when torch-fused is not in this case)."""
    ceil = case["ceiling"]
    ceil["gbps"] = _gbps(ceil["bytes"], ceil["ms"])
    ref = next((c for c in case["contestants"] if c["name"] == REFERENCE_CONTESTANT), None)
    for c in case["contestants"]:
        c["bytes_per_param"] = c["bytes_per_step"] / case["n_params"] if case["n_params"] else None
        c["state_bytes_per_param"] = (c["state_bytes"] / case["n_params"]
                                      if case["n_params"] and c.get("state_bytes") else None)
        c["gbps"] = _gbps(c["bytes_per_step"], c["ms"])
        c["frac_ceiling"] = (c["gbps"] / ceil["gbps"]
                             if c["gbps"] is not None and ceil["gbps"] else None)
        c["x_torch_fused"] = ref["ms"] / c["ms"] if ref is not None and c["ms"] > 0 else None
    return case


def _gbps(nbytes: float, ms: float) -> float | None:
    if not ms or ms <= 0 or math.isnan(ms):
        return None
    return nbytes / (ms * 1e-3) / 1e9



# ---------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------


DEFAULT_BUDGET_S = 10.0  # seconds of timed steps per contestant and case before it gets fewer rounds
DEFAULT_MIN_ROUNDS = 3


def run_benchmark(cases: Iterable[str] = DEFAULT_CASES, device: str | torch.device | None = None,
                  dtype: str | torch.dtype = "fp32", rounds: int | None = None, warmup: int = 2,
                  contestants: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  slow_limit: int | None = None, quick: bool = False,
                  progress: bool | None = None, lr: float = LR,
                  weight_decay: float = WEIGHT_DECAY, budget_s: float | None = DEFAULT_BUDGET_S,
                  min_rounds: int = DEFAULT_MIN_ROUNDS,
                  accuracy_steps: int = ACCURACY_STEPS) -> dict[str, Any]:
    """Run the named cases and return the full (JSON-serialisable) result.

    ``device`` defaults to cuda when available, else cpu. ``rounds`` (the most a contestant gets)
    defaults to 10 on CPU, 50 on CUDA (3 when ``quick``); ``budget_s`` and ``min_rounds`` give slow
    contestants fewer (``run_case``; ``budget_s=None``: everyone gets ``rounds``). ``contestants``
    defaults to every default contestant; ``exclude`` removes some (e.g. ``("torch-forloop",)``);
    ``slow_limit`` drops slow contestants only for cases with more params than that.
    ``accuracy_steps`` > 0 runs the accuracy protocol (``measure_accuracy``) for every available
    contestant first; 0 skips it. ``progress=None`` shows tqdm bars when stderr is a terminal."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch.cuda.is_available() is False")
    dtype = parse_dtype(dtype)
    if rounds is None:
        rounds = 3 if quick else (50 if device.type == "cuda" else 10)
    if rounds < 1 or min_rounds < 1:
        raise ValueError(f"rounds and min_rounds must be >= 1, got {rounds} and {min_rounds}")
    if budget_s is not None and budget_s <= 0:
        budget_s = None
    if quick:
        warmup = min(warmup, 1)
    cases = list(cases)
    for c in cases:
        if c not in CASES:
            raise ValueError(f"unknown case {c!r}; known cases: {', '.join(CASES)}")
    exclude = set(exclude)
    names = [n for n in (DEFAULT_CONTESTANTS if contestants is None else contestants) if n not in exclude]
    busy = cpu_busy()
    others = _OtherLoad()
    t0 = time.perf_counter()
    factories, skipped = available_contestants(device, names, dtype, lr, weight_decay, progress)
    probe_s = time.perf_counter() - t0

    acc: dict[str, dict[str, Any]] = {}
    acc_s = 0.0
    if accuracy_steps > 0 and factories:
        t0 = time.perf_counter()
        bar = progress_bar(len(factories), "accuracy", progress)
        try:
            acc = measure_accuracy(factories, device, lr=lr, weight_decay=weight_decay,
                                   steps=accuracy_steps, progress=bar)
        finally:
            bar.close()
        acc_s = time.perf_counter() - t0

    case_results = []
    for c in cases:
        t0 = time.perf_counter()
        res = run_case(c, case_shapes(c, device, quick), factories, device, dtype, rounds, warmup,
                       skipped=skipped, slow_limit=slow_limit, progress=progress,
                       budget_s=budget_s, min_rounds=min_rounds)
        res["elapsed_s"] = time.perf_counter() - t0
        for entry in res["contestants"]:
            if entry["name"] in acc:
                entry["accuracy"] = acc[entry["name"]]
        case_results.append(res)
    machine = machine_info(device)
    machine["cpu_busy_before"] = busy
    machine["cpu_others_during"] = others.fraction()
    return {
        "schema": 2,
        "machine": machine,
        "config": {"device": str(device), "dtype": _dtype_name(dtype), "rounds": rounds,
                   "min_rounds": min_rounds, "budget_s": budget_s,
                   "warmup": warmup, "quick": quick, "lr": lr, "weight_decay": weight_decay,
                   "slow_limit": slow_limit,
                   "contestants": {n: CONTESTANTS[n].description for n in names},
                   "reference": REFERENCE_CONTESTANT,
                   "accuracy": {"steps": accuracy_steps, "shapes": [list(s) for s in ACCURACY_SHAPES],
                                "decades": ACCURACY_DECADES, "zero_fraction": ACCURACY_ZERO_FRACTION,
                                "params": "fp32", "reference": "torch.optim.AdamW(foreach=False), fp32 state"}},
        "timing_s": {"probe": probe_s, "accuracy": acc_s},
        "accuracy": acc,
        "skipped": skipped,
        "cases": case_results,
    }
