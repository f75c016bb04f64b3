"""Every kernel instantiation the CUDA build has (217 for sm_90: adam_kernel 64, lowp_kernel 72,
int8_kernel 80, bump_device_steps 1) runs under the emulation here, each against the reference
with the same bits after every step: one small case per combination of param dtype, state format,
param rounding, table kind and the four flags (amsgrad, maximize, coupled, grad scale). The
matrix and the low-precision tests cover the combinations a user meets most; this sweep leaves
none of the others unexecuted."""
from __future__ import annotations

import itertools

import pytest
import torch

import onepass
from onepass import quant
from onepass.backends import BACKENDS, cuda_emu

from .._bits import first_difference

pytestmark = [pytest.mark.emu, pytest.mark.skipif(
    "cuda-emu" not in BACKENDS,
    reason="the emulated cuda backend is not built (tests/conftest.py builds it unless ONEPASS_EMU=0)")]

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}


def _combos():
    """(param dtype, state format, rounding, float3 maps, amsgrad, maximize, coupled, scaled):
    what validate_batch accepts, each reaching its own instantiation."""
    flags = list(itertools.product([False, True], repeat=3))  # maximize, coupled, scaled
    for d in DTYPES:
        for ams in (False, True):
            yield from ((d, "fp32", "nearest", True, ams, *f) for f in flags)
    for d in ("f32", "bf16", "f16"):
        rnds = ("nearest", "stochastic", "kahan") if d == "bf16" else ("nearest",)
        for rnd in rnds:
            yield from ((d, "bf16", rnd, True, False, *f) for f in flags)
            for fmap in (True, False):
                yield from ((d, "int8", rnd, fmap, False, *f) for f in flags)
            if rnd != "nearest":  # fp32 state with stochastic / Kahan bf16 params: lowp_kernel
                for ams in (False, True):
                    yield from ((d, "fp32", rnd, True, ams, *f) for f in flags)


def _run(combo, monkeypatch):
    d, fmt, rnd, fmap, ams, maximize, coupled, scaled = combo
    dtype = DTYPES[d]
    if not fmap:
        monkeypatch.setattr(quant, "SIGNED_MAP", "dynamic")
        monkeypatch.setattr(quant, "UNSIGNED_MAP", "dynamic")
    gen = torch.Generator().manual_seed(len(str(combo)))
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3, 300), (8 * 37 + 5,))]
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=ams, maximize=maximize, decoupled=not coupled,
              state_dtype=fmt, param_rounding=rnd, seed=3, min_int8_numel=0)
    opts, params = [], []
    for backend in ("cuda-emu", "reference"):
        ps = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in init]  # own storage, f64 too
        params.append(ps)
        opts.append(onepass.AdamW(ps, backend=backend, **kw))
    for step in range(2):
        for ps, opt in zip(params, opts):
            g = torch.Generator().manual_seed(100 + step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
                if scaled:
                    p.grad.mul_(256)
            if scaled:
                opt.grad_scale, opt.found_inf = torch.tensor(256.0), torch.tensor(0.0)
            opt.step()
        assert opts[0].last_backends == ["cuda-emu"]
        for i, (a, b) in enumerate(zip(params[0], params[1])):
            why = first_difference(a.detach(), b.detach())
            assert why is None, f"{combo} step {step + 1}, param {i}: {why}"
            sa, sb = opts[0].state[a], opts[1].state[b]
            assert sorted(sa) == sorted(sb)
            for k in sa:
                why = first_difference(sa[k], sb[k])
                assert why is None, f"{combo} step {step + 1}, param {i} {k}: {why}"


def test_every_instantiation_runs_with_the_reference_bits(monkeypatch):
    module = cuda_emu.build()
    combos = list(_combos())
    for combo in combos:
        with monkeypatch.context() as m:
            _run(combo, m)
    # the device step counts: bump_device_steps (capturable) after a step of each kernel family
    for fmt in ("fp32", "int8"):
        ps = [torch.nn.Parameter(torch.randn(3, 300))]
        opt = onepass.AdamW(ps, backend="cuda-emu-capturable", capturable=True, state_dtype=fmt,
                            min_int8_numel=0)
        ps[0].grad = torch.randn(3, 300)
        opt.step()
        assert float(opt.state[ps[0]]["step"]) == 1.0
    compiled, ran = set(module.kernels_compiled()), set(module.kernels_run())
    missing = sorted(compiled - ran)
    print(f"\nemulated cuda kernels executed: {len(compiled & ran)} of {len(compiled)} instantiations")
    assert not missing, f"{len(missing)} of {len(compiled)} never ran, e.g. {missing[:3]}"
    assert len(compiled) == 217  # what the sm_90 build has (scripts/check_codegen.py counts them)
