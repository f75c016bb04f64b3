"""CPU step benchmarks (pytest-benchmark): onepass vs torch forloop / foreach / fused.

    pytest bench/ --benchmark-only [--bench-slow]

One benchmark group per case; each test times ``optimizer.step()`` on the case's shared params and
grads, after warm-up steps that allocate the state. ``extra_info`` carries the effective bandwidth
(bytes an AdamW step must move / median time) so the saved JSON can be compared with the figures of
``python -m onepass``. The ceiling (in-place ``mul_`` over 4x the case's elements) is benchmarked in
the same group for reference.
"""

from __future__ import annotations

import gc

import pytest

CASES = ("gpt2", "small")
CONTESTANTS = ("onepass", "torch-fused", "torch-foreach", "torch-forloop")
# Few rounds: a gpt2 step moves 3.5 GB (about 0.1 s fused, 0.5-5 s forloop on a small machine).
ROUNDS = {"gpt2": 5, "small": 20}
WARMUP_STEPS = 2


def _median_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    inner = getattr(stats, "stats", None)
    return getattr(inner, "median", None)


@pytest.mark.parametrize("case,name", [(c, n) for c in CASES for n in CONTESTANTS],
                         ids=[f"{c}-{n}" for c in CASES for n in CONTESTANTS])
def test_step(benchmark, case, name, case_params, cpu_contestants, bench_slow):
    from onepass import benchmark as b

    factories, skipped = cpu_contestants
    if name in skipped:
        pytest.skip(f"{name} unavailable: {skipped[name]}")
    if b.CONTESTANTS[name].slow and case == "gpt2" and not bench_slow:
        pytest.skip(f"{name} on gpt2 takes seconds per step; pass --bench-slow to include it")

    params = case_params(case)
    opt = factories[name](params)
    for _ in range(WARMUP_STEPS):
        opt.step()
    nbytes = b.bytes_moved(params, b.state_nbytes(opt) or None)

    benchmark.group = f"{case} (cpu fp32)"
    benchmark.extra_info.update(case=case, contestant=name, n_params=b.count_params(p.shape for p in params),
                                bytes_per_step=nbytes)
    benchmark.pedantic(opt.step, rounds=ROUNDS[case], iterations=1, warmup_rounds=1)
    median = _median_s(benchmark)
    if median:
        benchmark.extra_info["gbps"] = nbytes / median / 1e9
    del opt
    gc.collect()


@pytest.mark.parametrize("case", CASES)
def test_ceiling(benchmark, case):
    from onepass import benchmark as b

    n = b.count_params(b.case_shapes(case, "cpu"))
    ceiling = b.make_ceiling("cpu", n)
    ceiling.fn()  # touch the pages once
    benchmark.group = f"{case} (cpu fp32)"
    benchmark.extra_info.update(case=case, contestant=f"ceiling {ceiling.kind}", bytes_per_step=ceiling.bytes)
    benchmark.pedantic(ceiling.fn, rounds=ROUNDS[case], iterations=1, warmup_rounds=1)
    median = _median_s(benchmark)
    if median:
        benchmark.extra_info["gbps"] = ceiling.bytes / median / 1e9
