"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): the byte accounting:
state bytes (tensor-subclass and quantized state included) and bytes moved
(onepass.benchmark.accounting)."""

from __future__ import annotations

import pytest
import torch

from onepass import benchmark as b


def test_bytes_per_param():
    assert b.bytes_per_param(4, 4, 8) == 28  # fp32 params, grads, state
    assert b.bytes_per_param() == 28
    assert b.bytes_per_param(2, 2, 4) == 14  # bf16 params, grads, state
    assert b.bytes_per_param(2, 2, 8) == 22  # bf16 params with fp32 state
    assert b.bytes_per_param(4, 4, 2) == 16  # 8-bit m and v


@pytest.mark.parametrize("dtype,per_param", [("fp32", 28), ("bf16", 14)])
def test_state_and_bytes_moved(dtype, per_param):
    ps = b.make_params([(10, 3), (17,)], "cpu", dtype)
    n = 47
    assert b.bytes_moved(ps) == per_param * n  # torch's layout assumed
    opt = torch.optim.AdamW(ps, lr=b.LR, weight_decay=b.WEIGHT_DECAY, foreach=False)
    assert b.state_nbytes(opt) == 0
    opt.step()
    elt = ps[0].element_size()
    assert b.state_nbytes(opt) == 2 * elt * n  # exp_avg + exp_avg_sq; the 0-dim step is not counted
    assert b.bytes_moved(ps, b.state_nbytes(opt)) == per_param * n


def test_state_nbytes_counts_a_shared_tensor_once():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.SGD([p], lr=0.1)
    buf = torch.zeros(8)
    opt.state[p] = {"a": buf, "b": buf, "step": torch.tensor(1.0)}
    assert b.state_nbytes(opt) == 32


class _Packed(torch.Tensor):
    """A minimal traceable wrapper subclass (as torchao's low-bit state is): uint8 codes plus a
    float32 scale per 4 elements, presenting itself as a float32 tensor."""

    @staticmethod
    def __new__(cls, codes, scale):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32,
                                                   device=codes.device)

    def __init__(self, codes, scale):
        self.codes = codes
        self.scale = scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return _Packed(inner["codes"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


def test_state_nbytes_counts_subclass_inner_tensors_and_maps():
    p = torch.nn.Parameter(torch.zeros(64))
    q = torch.nn.Parameter(torch.zeros(64))
    opt = torch.optim.SGD([p, q], lr=0.1)
    packed = _Packed(torch.zeros(64, dtype=torch.uint8), torch.zeros(16))
    assert b.state_nbytes(opt) == 0
    assert [t.dtype for t in b.state_tensors(packed)] == [torch.uint8, torch.float32]
    qmap = torch.zeros(256)  # one map shared by every param's state, as bitsandbytes keeps it
    opt.state[p] = {"exp_avg": packed, "qmap": qmap, "step": torch.tensor(3.0)}
    opt.state[q] = {"state1": torch.zeros(64, dtype=torch.uint8), "absmax1": torch.zeros(1),
                    "qmap1": qmap, "nested": [torch.zeros(2, dtype=torch.float64)], "step": 3}
    # codes 64 + scale 64 + map 1024 (once) + codes 64 + absmax 4 + nested 16
    assert b.state_nbytes(opt) == 64 + 64 + 1024 + 64 + 4 + 16


def test_state_nbytes_bitsandbytes_8bit():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (the bench extra)")
    p = torch.nn.Parameter(torch.randn(16, 512))  # 8192 elements: quantized, 32 blocks of 256
    small = torch.nn.Parameter(torch.randn(7))  # below 4096 elements: fp32 state
    p.grad, small.grad = torch.randn_like(p), torch.randn_like(small)
    opt = bnb.optim.AdamW8bit([p, small], lr=1e-3)
    opt.step()
    blocks = 8192 // 256
    # codes of m and v, their absmax per block, two 256-entry float32 maps; 2 x 7 fp32 for `small`
    expected_quantized = 2 * 8192 + 2 * 4 * blocks + 2 * 256 * 4
    assert b.state_nbytes(opt) == expected_quantized + 2 * 7 * 4


def test_state_nbytes_torchao_subclass():
    pytest.importorskip("torchao", reason="torchao not installed (the bench extra)")
    with b._quiet_import():
        from torchao.optim.subclass_8bit import OptimState8bit
    p = torch.nn.Parameter(torch.zeros(16, 512))
    opt = torch.optim.SGD([p], lr=0.1)  # only its .state is used: no step, so no torch.compile
    m = OptimState8bit.zeros(p.shape, True, 256, p.device)
    v = OptimState8bit.zeros(p.shape, False, 256, p.device)
    opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": m, "exp_avg_sq": v}
    # each: 8192 codes, 32 float32 scales, its own 256-entry float32 map
    assert b.state_nbytes(opt) == 2 * (8192 + 32 * 4 + 256 * 4)
