"""CPU step benchmarks (pytest-benchmark): the contestants and cases of ``python -m onepass``.

    pytest bench/ --benchmark-only [--bench-budget SECONDS] [--benchmark-save=NAME]

One benchmark group per case; each test times ``optimizer.step()`` on the case's shared params and
grads, after warm-up steps that allocate the state (and compile, for torchao). Every default
contestant is parametrized (``onepass.benchmark.DEFAULT_CONTESTANTS``); one whose peer is not
installed or cannot run here is skipped with the reason. A slow contestant gets fewer rounds
(``plan_rounds``: the budget per contestant and case, at least ``min_rounds``), never dropped.
``extra_info`` carries what the command's table shows beside the time: the effective bandwidth,
the measured state bytes per param and the accuracy against torch.optim.AdamW with fp32 state, so
a saved run holds all three. Unlike the command, the contestants here run one after another, not
interleaved. The ceiling (in-place ``mul_`` over 4x the case's elements) is in the same group.
"""

from __future__ import annotations

import gc

import pytest
import torch

from onepass import benchmark as b

CASES = ("gpt2", "small")
CONTESTANTS = b.DEFAULT_CONTESTANTS
# At most this many rounds; a gpt2 step moves 3.5 GB (about 0.1 s fused, seconds for the 8-bit peers
# on a small machine), so slow contestants get fewer (the budget).
ROUNDS = {"gpt2": 5, "small": 20}
WARMUP_STEPS = 2


def _median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    inner = getattr(stats, "stats", None)
    return getattr(inner, "median", None)


@pytest.mark.parametrize("case,name", [(c, n) for c in CASES for n in CONTESTANTS],
                         ids=[f"{c}-{n}" for c in CASES for n in CONTESTANTS])
def test_step(benchmark, case, name, case_params, cpu_contestants, bench_budget, accuracy_reference):
    factories, skipped = cpu_contestants
    if name in skipped:
        pytest.skip(f"{name} unavailable: {skipped[name]}")

    params = case_params(case)
    opt = factories[name](params)
    timer = b.Timer(torch.device("cpu"))
    warm_ms = [timer(opt.step) for _ in range(WARMUP_STEPS)]
    rounds = b.plan_rounds(min(warm_ms[1:] or warm_ms), ROUNDS[case], bench_budget,
                           b.DEFAULT_MIN_ROUNDS)
    sb = b.state_nbytes(opt)
    nbytes = b.bytes_moved(params, sb or None)
    n_params = b.count_params(p.shape for p in params)

    benchmark.group = f"{case} (cpu fp32)"
    benchmark.extra_info.update(case=case, contestant=name, n_params=n_params,
                                bytes_per_step=nbytes, state_bytes_per_param=sb / n_params,
                                warmup_ms=warm_ms)
    acc = b.accuracy(factories[name], accuracy_reference)
    benchmark.extra_info.update(accuracy_max_abs=acc["max_abs"], accuracy_rel=acc["rel"])
    benchmark.pedantic(opt.step, rounds=rounds, iterations=1, warmup_rounds=0)
    median = _median_s(benchmark)
    if median:
        benchmark.extra_info["gbps"] = nbytes / median / 1e9
    del opt
    gc.collect()


@pytest.mark.parametrize("case", CASES)
def test_ceiling(benchmark, case):
    n = b.count_params(b.case_shapes(case, "cpu"))
    ceiling = b.make_ceiling("cpu", n)
    ceiling.fn()  # touch the pages once
    benchmark.group = f"{case} (cpu fp32)"
    benchmark.extra_info.update(case=case, contestant=f"ceiling {ceiling.kind}", bytes_per_step=ceiling.bytes)
    benchmark.pedantic(ceiling.fn, rounds=ROUNDS[case], iterations=1, warmup_rounds=1)
    median = _median_s(benchmark)
    if median:
        benchmark.extra_info["gbps"] = ceiling.bytes / median / 1e9
