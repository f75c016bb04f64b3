"""Fixtures for the pytest-benchmark files. Run by hand, not in CI:

    pytest bench/ --benchmark-only                  # gpt2 and small, CPU
    pytest bench/ --benchmark-only --bench-slow     # also torch-forloop on gpt2 (seconds per step)

Cases, contestants and byte accounting come from ``onepass.benchmark``, the same definitions that
``python -m onepass`` uses; nothing is redefined here.
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


def pytest_addoption(parser):
    parser.addoption("--bench-slow", action="store_true", default=False,
                     help="also run slow contestants (torch-forloop) on the gpt2 case")


@pytest.fixture(scope="session")
def bench_slow(request) -> bool:
    return request.config.getoption("--bench-slow")


@pytest.fixture(scope="session")
def cpu_contestants():
    """(factories, skipped) for the CPU contestants, probed once per session."""
    from onepass import benchmark as b

    return b.available_contestants("cpu", ["onepass", "torch-fused", "torch-foreach", "torch-forloop"])


@pytest.fixture(scope="session")
def case_params():
    """``case_params(name)`` -> the shared params (with grads) of a case, on CPU in fp32.

    Only the most recent case is kept: gpt2's params and grads alone are 1 GB, and every optimizer
    built on them adds 1 GB of state, so holding several cases at once would waste memory."""
    from onepass import benchmark as b

    cache: dict[str, list] = {}

    def get(name: str):
        if name not in cache:
            cache.clear()
            cache[name] = b.make_params(b.case_shapes(name, "cpu"), "cpu", "fp32")
        return cache[name]

    yield get
    cache.clear()
