"""Property test: random shapes, dtypes and hyperparameters, every available backend, the same
``torch.equal`` contract as the matrix, so no hand-picked case list can hide a bug."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onepass

BACKENDS = [b for b in onepass.available_backends("cpu") if b != "reference"]
if torch.cuda.is_available():
    BACKENDS += [f"cuda:{b}" for b in onepass.available_backends("cuda")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

shape = st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple)
hparams = st.fixed_dictionaries({
    "lr": st.floats(0.0, 1.0),
    "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)),
    "eps": st.floats(0.0, 1e-3),
    "weight_decay": st.floats(0.0, 1.0),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
    "decoupled": st.booleans(),
})


def _run(backend, device, shapes, dtypes, hp, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(d).to(device)) for s, d in zip(shapes, dtypes)]
    opt = onepass.AdamW(params, backend=backend, **hp)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 3).to(p.dtype).to(device)
        opt.step()
    out = [p.detach().cpu() for p in params]
    for p in params:
        out += [opt.state[p][k].cpu() for k in sorted(opt.state[p])]
    return out


@pytest.mark.skipif(not BACKENDS, reason="no compiled backend available: the reference alone has nothing to compare")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backend=st.sampled_from(BACKENDS or ["reference"]),
    shapes=st.lists(shape, min_size=1, max_size=4),
    dtype_idx=st.lists(st.integers(0, len(DTYPES) - 1), min_size=4, max_size=4),
    hp=hparams,
    seed=st.integers(0, 2**31 - 1),
)
def test_random_problems_match_the_reference(backend, shapes, dtype_idx, hp, seed):
    device = "cpu"
    if backend.startswith("cuda:"):
        device, backend = "cuda", backend.split(":", 1)[1]
    dtypes = [DTYPES[dtype_idx[i]] for i in range(len(shapes))]
    got = _run(backend, device, shapes, dtypes, hp, seed, steps=3)
    want = _run("reference", "cpu", shapes, dtypes, hp, seed, steps=3)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        # NaN compares unequal in torch.equal; compare bit patterns so NaN == NaN at the same place
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))
