"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): the case definitions
and their inputs (onepass.benchmark.cases)."""

from __future__ import annotations

import pytest
import torch

from onepass import benchmark as b


def test_gpt2_counts():
    shapes = b.gpt2()
    b.check_gpt2_counts(shapes)
    assert len(shapes) == 148 == b.GPT2_TENSORS
    assert b.count_params(shapes) == 124_439_808 == b.GPT2_PARAMS
    assert shapes[0] == (50257, 768) and shapes[1] == (1024, 768)  # wte, wpe
    assert shapes[2:14] == [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                            (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    assert shapes[-2:] == [(768,), (768,)]  # ln_f
    with pytest.raises(AssertionError):
        b.check_gpt2_counts(b.gpt2(n_layer=11))


def test_small_and_huge_shapes():
    assert b.small() == [(4096,)] * 2000
    assert b.huge("cpu") == [(2**27,)]
    assert b.huge("cuda") == [(2**30,)]
    assert b.huge(torch.device("cuda", 0)) == [(2**30,)]
    assert b.case_shapes("small") == b.small()
    assert b.case_shapes("gpt2") == b.gpt2()
    assert b.case_shapes("huge", "cpu") == [(2**27,)]
    # --quick keeps the structure but shrinks the cases.
    q = b.case_shapes("gpt2", quick=True)
    assert len(q) == 2 + 12 + 2 and b.count_params(q) < 10**7
    assert len(b.case_shapes("small", quick=True)) < 2000
    with pytest.raises(ValueError, match="unknown case"):
        b.case_shapes("nope")


def test_make_params_shared_inputs():
    ps = b.make_params([(3, 5), (7,)], "cpu", "fp32", seed=3)
    again = b.make_params([(3, 5), (7,)], "cpu", "fp32", seed=3)
    for p, q in zip(ps, again):
        assert isinstance(p, torch.nn.Parameter) and p.is_leaf
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.shape == p.shape
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)  # deterministic
        assert (p.grad != 0).all()  # gradients are never zero
        assert p.abs().max() < 0.2 and p.grad.abs().max() < 0.01  # randn*0.02, randn*1e-3
    bf = b.make_params([(4,)], "cpu", "bf16")
    assert bf[0].dtype == torch.bfloat16 and bf[0].grad.dtype == torch.bfloat16
