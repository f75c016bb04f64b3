"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): the accuracy
protocol (onepass.benchmark.accuracy)."""

from __future__ import annotations

import json

import pytest
import torch

from onepass import benchmark as b


def test_accuracy_grads_span_decades_and_have_zeros():
    shapes = [(8, 1024)]
    steps = list(b.accuracy_grads(shapes, steps=3, decades=4.0, zero_fraction=0.25))
    again = list(b.accuracy_grads(shapes, steps=3, decades=4.0, zero_fraction=0.25))
    assert len(steps) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(steps, again))
    g = steps[0][0]
    assert (g == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert not torch.equal(steps[0][0] == 0, steps[1][0] == 0)  # fresh zeros each step
    block = g.flatten()[:256].abs()
    nz = block[block > 0]
    assert (nz.max() / nz.min()).item() > 1e3  # more than three decades inside one block
    assert g.abs().max() < 10


class _FlushSmallV(torch.optim.AdamW):
    """torch AdamW whose second moment loses what a dynamic 8-bit map would: after each step,
    elements of v below 3.25e-7 of their 256-block's absmax are set to 0 (m is kept)."""

    def step(self, closure=None):
        out = super().step(closure)
        for st in self.state.values():
            v = st["exp_avg_sq"]
            if v.numel() % 256 == 0:
                blocks = v.view(-1, 256)
                blocks.masked_fill_(blocks < 3.25e-7 * blocks.amax(dim=1, keepdim=True), 0.0)
        return out


def test_accuracy_protocol_exposes_v_dequantized_to_zero():
    kw = dict(steps=20, lr=1e-3, weight_decay=1e-2)
    ref = b.accumulated_update(b._reference_factory(1e-3, 1e-2), steps=20)
    same = b.accuracy(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
                      ref, **kw)
    assert same["finite"] and same["rel"] < 1e-5 and same["max_abs"] < 1e-6
    assert same["ref_max"] <= 20 * 1e-3 * 1.01  # Adam moves an element by about lr per step
    bad = b.accuracy(lambda ps: _FlushSmallV(ps, lr=1e-3, weight_decay=1e-2, foreach=False), ref, **kw)
    # lr * m / eps on some elements: far larger than every reference update
    assert bad["finite"] and bad["max_abs"] > 10 * bad["ref_max"] and bad["rel"] > 1
    # Without the zero gradients the same flaw stays hidden: the protocol needs both ingredients.
    ref0 = b.accumulated_update(b._reference_factory(1e-3, 1e-2), steps=20, zero_fraction=0.0)
    hidden = b.accuracy(lambda ps: _FlushSmallV(ps, lr=1e-3, weight_decay=1e-2, foreach=False), ref0,
                        zero_fraction=0.0, **kw)
    assert hidden["max_abs"] < bad["max_abs"] / 10


def test_accuracy_non_finite_and_errors():
    class Nan(torch.optim.SGD):
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    p.data.fill_(float("nan"))

    a = b.accuracy(lambda ps: Nan(ps, lr=0.1), steps=2)
    assert a["finite"] is False and a["max_abs"] is None and a["rel"] is None
    json.dumps(a)

    def broken(ps):
        raise RuntimeError("no kernel for this")

    out = b.measure_accuracy({"torch-foreach": b.make_factory("torch-foreach"), "broken": broken},
                             steps=2)
    assert out["broken"] == {"steps": 2, "error": "RuntimeError: no kernel for this"}
    assert out["torch-foreach"]["rel"] < 1e-5
