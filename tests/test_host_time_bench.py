"""A smoke run of bench/host_time.py (issue 16's host-time measure) on tiny sizes: every contender
runs and reports a time, the stubbed triton launches are put back afterwards, and the stubbed
contenders really skip their kernels (params unchanged while counts advance). No timing is
asserted."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import onepass

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "host_time.py")


def _load():
    spec = importlib.util.spec_from_file_location("host_time", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_contender_runs_and_the_kernels_are_put_back():
    ht = _load()
    res = ht.run(rounds=1, reps=2, sizes=(3,))
    times = res["3"]
    assert {"noop", "onepass-cpu fp32", "onepass-cpu fp32 set_to_none", "torch-fused"} <= set(times)
    assert all(t > 0 for t in times.values())
    if importlib.util.find_spec("triton") is not None:
        assert "triton-host fp32 (launch stubbed)" in times
        from onepass.backends import triton as tb

        assert not isinstance(tb._load().adam_kernel, ht._NoLaunch)


def _assert_kernels_skipped(backend: str) -> None:
    p = torch.ones(8, requires_grad=True)
    p.grad = torch.ones(8)
    opt = onepass.AdamW([p], lr=0.1, backend=backend)
    opt.step()
    opt.step()
    assert torch.equal(p.detach(), torch.ones(8))  # no kernel ran
    assert opt.state[p]["step"].item() == 2  # the host step did


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_stub_skips_the_kernels_only():
    ht = _load()
    assert ht._triton_stub()
    try:
        _assert_kernels_skipped("triton")
    finally:
        ht._unstub()


def test_the_emulated_stub_skips_the_kernels_only():
    from onepass.backends import BACKENDS

    emu = BACKENDS.get("cuda-emu")
    if emu is None:
        pytest.skip("the emulated cuda backend is not enabled (ONEPASS_EMU=0)")
    emu.stub_launch = True
    try:
        _assert_kernels_skipped("cuda-emu")
    finally:
        emu.stub_launch = False
