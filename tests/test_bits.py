"""tests/_bits.py: bit-exact comparison with NaNs compared as values (ARCHITECTURE.md section 2)."""
from __future__ import annotations

import pytest
import torch

from ._bits import assert_same_bits, first_difference, same_bits

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
IDS = ["float16", "bfloat16", "float32", "float64"]
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _nan(dtype, bits_value: int) -> torch.Tensor:
    """A 0-dim tensor of ``dtype`` holding the raw bit pattern ``bits_value`` (two's complement)."""
    size = torch.empty((), dtype=dtype).element_size()
    if bits_value >= 1 << (8 * size - 1):
        bits_value -= 1 << (8 * size)
    return torch.tensor(bits_value, dtype=_INT[size]).view(dtype)


# (canonical quiet NaN, another payload, the same payload negative) as raw bits per dtype
NANS = {
    torch.float16: (0x7E00, 0x7C01, 0xFE00),
    torch.bfloat16: (0x7FC0, 0x7F81, 0xFFC0),
    torch.float32: (0x7FC00000, 0x7F800001, 0xFFC00000),
    torch.float64: (0x7FF8000000000000, 0x7FF0000000000001, 0xFFF8000000000000),
}


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS)
def test_nans_with_other_payloads_and_signs_are_the_same(dtype):
    canonical, payload, negative = (_nan(dtype, v) for v in NANS[dtype])
    for x in (canonical, payload, negative):
        assert torch.isnan(x)
    # the bit patterns really differ (so a raw comparison would fail)
    assert not torch.equal(_nan(dtype, NANS[dtype][0]).view(_INT[canonical.element_size()]),
                           _nan(dtype, NANS[dtype][1]).view(_INT[canonical.element_size()]))
    a = torch.stack([torch.tensor(1.5, dtype=dtype), canonical, torch.tensor(-2.0, dtype=dtype), canonical])
    b = torch.stack([torch.tensor(1.5, dtype=dtype), payload, torch.tensor(-2.0, dtype=dtype), negative])
    assert same_bits(a, b)
    assert same_bits(b, a)
    assert_same_bits(a, b, "nans")


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS)
def test_nan_against_a_number_differs(dtype):
    a = torch.tensor([1.0, float("nan"), 3.0], dtype=dtype)
    for other in (2.0, 0.0, float("inf")):
        b = torch.tensor([1.0, other, 3.0], dtype=dtype)
        assert not same_bits(a, b)
        assert not same_bits(b, a)
    with pytest.raises(AssertionError, match=r"param 0: 1 of 3 elements differ; first at index \(1,\)"):
        assert_same_bits(a, torch.tensor([1.0, 2.0, 3.0], dtype=dtype), "param 0")


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS)
def test_signed_zeros_differ(dtype):
    pos, neg = torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    neg[2] = -0.0
    assert torch.equal(pos, neg)  # what torch.equal would let through
    assert not same_bits(pos, neg)
    with pytest.raises(AssertionError, match=r"exp_avg: 1 of 3 elements differ; first at index \(2,\)"):
        assert_same_bits(pos, neg, "exp_avg")


@pytest.mark.parametrize("dtype", FLOATS, ids=IDS)
def test_one_ulp_differs_and_equal_bits_pass(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 13, generator=gen).to(dtype)
    assert same_bits(a, a.clone())
    assert same_bits(a.t(), a.clone().t().contiguous())  # layout does not matter
    b = a.clone()
    b.view(_INT[b.element_size()])[3, 5] += 1  # one ulp
    assert not same_bits(a, b)
    with pytest.raises(AssertionError, match=r"first at index \(3, 5\)"):
        assert_same_bits(a, b)


def test_dtype_shape_and_scalars():
    x = torch.tensor([1.0, 2.0])
    assert first_difference(x, x.double()).startswith("dtype")
    assert first_difference(x, x.view(2, 1)).startswith("shape")
    assert same_bits(torch.tensor(float("nan")), _nan(torch.float32, 0x7F800001))  # 0-dim
    assert not same_bits(torch.tensor(0.0), torch.tensor(-0.0))
    assert first_difference(x, [1.0, 2.0]).startswith("not two tensors")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool])
def test_integer_and_bool_tensors(dtype):
    a = torch.tensor([0, 1, 1, 0]).to(dtype)
    assert same_bits(a, a.clone())
    b = a.clone()
    b[1] = 0
    assert not same_bits(a, b)
    with pytest.raises(AssertionError, match=r"codes: 1 of 4 elements differ; first at index \(1,\)"):
        assert_same_bits(a, b, "codes")
