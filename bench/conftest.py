"""Fixtures for the pytest-benchmark files. Run by hand, not in CI (``pip install -e '.[bench]'``):

    pytest bench/ --benchmark-only                          # gpt2 and small, CPU, every contestant
    pytest bench/ --benchmark-only -k "small"               # one case
    pytest bench/ --benchmark-only --benchmark-save=NAME    # keep the run (.benchmarks/)
    pytest-benchmark compare 0001 0002 --group-by=group --columns=median,min,rounds

Cases, contestants, the time budget, byte accounting and the accuracy protocol come from
``onepass.benchmark``, the same definitions that ``python -m onepass`` uses; nothing is redefined
here. ``--bench-budget SECONDS`` is the time per contestant and case (default: the command's).
"""

from __future__ import annotations

import os
import sys

import pytest

try:
    from onepass import benchmark as _b  # noqa: F401
except ImportError:
    # Not installed yet (pip install -e .): use the source tree. Harmless once it is installed.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def pytest_configure(config):
    # torch warns once per tensor subclass without a stable cache hash (torchao's low-bit state).
    config.addinivalue_line("filterwarnings", "ignore:.*_stable_hash_for_caching:UserWarning")


def pytest_addoption(parser):
    from onepass import benchmark as b

    parser.addoption("--bench-budget", type=float, default=b.DEFAULT_BUDGET_S,
                     help="seconds of timed steps per contestant and case; a slower contestant gets "
                          f"fewer rounds, at least {b.DEFAULT_MIN_ROUNDS} (default "
                          f"{b.DEFAULT_BUDGET_S:g})")


@pytest.fixture(scope="session")
def bench_budget(request) -> float:
    return request.config.getoption("--bench-budget")


@pytest.fixture(scope="session")
def cpu_contestants():
    """(factories, skipped) for every default contestant on the CPU, probed once per session."""
    from onepass import benchmark as b

    return b.available_contestants("cpu", b.DEFAULT_CONTESTANTS)


@pytest.fixture(scope="session")
def accuracy_reference():
    """The accumulated update of torch.optim.AdamW (fp32 state) under the accuracy protocol."""
    from onepass import benchmark as b

    return b.accumulated_update(b._reference_factory(b.LR, b.WEIGHT_DECAY))


@pytest.fixture(scope="session")
def case_params():
    """``case_params(name)`` -> the shared params (with grads) of a case, on CPU in fp32.

    Only the most recent case is kept: gpt2's params and grads alone are 1 GB, and every optimizer
    built on them adds up to 1 GB of state, so holding several cases at once would waste memory."""
    from onepass import benchmark as b

    cache: dict[str, list] = {}

    def get(name: str):
        if name not in cache:
            cache.clear()
            cache[name] = b.make_params(b.case_shapes(name, "cpu"), "cpu", "fp32")
        return cache[name]

    yield get
    cache.clear()
