"""The cuda backend's host step (csrc/cuda/host_step.h), run here through the emulated backend:
the defects a review of the CUDA code found, each fixed, each shown here. Every check runs before
the first launch, so a bad batch changes nothing; graph capture refuses what a replay would
freeze; grad_scale and found_inf keep their float64 values."""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

from .._bits import first_difference

pytestmark = [pytest.mark.emu, pytest.mark.skipif(
    "cuda-emu" not in BACKENDS,
    reason="the emulated cuda backend is not built (tests/conftest.py builds it unless ONEPASS_EMU=0)")]


def _snapshot(opt, params):
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for _, v in sorted(opt.state[p].items())]
    return out


def _same(a, b):
    return len(a) == len(b) and all(first_difference(x, y) is None for x, y in zip(a, b))


def _two_dtype_group(backend, **kw):
    # float32 and bfloat16 params in one group: two launches, float32's first
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, generator=gen)),
              torch.nn.Parameter(torch.randn(300, generator=gen).bfloat16())]
    opt = onepass.AdamW(params, lr=1e-2, backend=backend, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, params


def test_a_bad_step_count_is_refused_before_the_first_launch():
    # device step counts must be float32: a float64 one of the second dtype's param used to be
    # refused inside the per-dtype loop, after the first dtype's kernel had written its params
    opt, params = _two_dtype_group("cuda-emu-capturable", capturable=True)
    opt.state[params[1]]["step"] = opt.state[params[1]]["step"].double()
    before = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="must be float32"):
        opt.step()
    assert _same(_snapshot(opt, params), before)


def test_capture_refuses_host_step_counts_and_writes_nothing():
    emu = BACKENDS["cuda-emu"]
    opt, params = _two_dtype_group("cuda-emu")
    before = _snapshot(opt, params)
    emu.capturing = True
    try:
        with pytest.raises(RuntimeError, match="being captured.*step counts live on the host"):
            opt.step()
    finally:
        emu.capturing = False
    assert _same(_snapshot(opt, params), before)
    opt.step()  # outside a capture the same step runs
    assert not _same(_snapshot(opt, params), before)


def test_capture_with_device_step_counts_runs():
    emu = BACKENDS["cuda-emu-capturable"]
    opt, params = _two_dtype_group("cuda-emu-capturable", capturable=True)
    emu.capturing = True
    try:
        opt.step()
    finally:
        emu.capturing = False
    assert float(opt.state[params[0]]["step"]) == 2.0


@pytest.mark.parametrize("backend", ["cuda-emu", "cuda-emu-capturable"])
def test_float64_grad_scale_and_found_inf_keep_their_values(backend):
    # a float64 param divides by the float64 grad_scale (1024.1 is not a float32), and a
    # found_inf of 1e-300 (0 in float32) still skips the step
    def run(name):
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(257, generator=gen, dtype=torch.float64))]
        opt = onepass.AdamW(params, lr=1e-2, backend=name, capturable=name.endswith("capturable"))
        out = []
        for step, fi in enumerate((0.0, 1e-300, 0.0)):
            params[0].grad = torch.randn(257, generator=gen, dtype=torch.float64) * 1024.1
            opt.grad_scale = torch.tensor(1024.1, dtype=torch.float64)
            opt.found_inf = torch.tensor(fi, dtype=torch.float64)
            opt.step()
            out.append(_snapshot(opt, params))
        return out

    got, want = run(backend), run("reference")
    for step, (a, b) in enumerate(zip(got, want)):
        assert _same(a, b), f"step {step + 1}"
    assert _same(got[1], got[0])  # the tiny found_inf skipped step 2
    assert float(got[2][-1]) == 2.0  # the step count: two steps counted


def test_found_inf_with_host_counts_is_left_to_the_kernels():
    # Host counts under a GradScaler: the kernels skip on found_inf themselves (no host sync),
    # the counts advance and the optimizer's next settle takes them back after a skipped step.
    from onepass.backends.base import SkippedCounts

    opt, params = _two_dtype_group("cuda-emu")
    before = _snapshot(opt, params)
    raw = [dict.__getitem__(opt.state, p)["step"] for p in params]  # (reads that settle nothing)
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert len(opt._deferred) == 1 and isinstance(opt._deferred[0], SkippedCounts)
    assert [float(c) for c in raw] == [2.0, 2.0]  # advanced until settled
    assert _same(_snapshot(opt, params), before)  # (a state read: settled)
    assert [float(c) for c in raw] == [1.0, 1.0] and not opt._deferred
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 2.0
    assert not _same(_snapshot(opt, params), before)
