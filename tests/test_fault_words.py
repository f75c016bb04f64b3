"""One fault, one error: the same exception type and words on every backend, naming the param by
its position in its group (and its name from param_names), not by its place in an internal
batch (a group's params with grads, split by state format)."""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass import _ops
from onepass.backends import BACKENDS, Batch

BACKENDS_HERE = ["reference", "cpu", "cuda-emu", "triton"]


def _fault(ps, opt, fault):
    st = opt.state[ps[2]]
    if fault == "grad_shape":
        ps[2].grad.data = torch.zeros(60, 70)
    elif fault == "grad_dtype":
        ps[2].grad.data = ps[2].grad.data.double()
    elif fault == "grad_sparse":
        ps[2].grad = ps[2].grad.to_sparse()
    elif fault == "state_shape":
        st["exp_avg"] = torch.zeros(34)
    elif fault == "state_dtype":
        st["exp_avg_sq"] = st["exp_avg_sq"].double()
    elif fault == "int8_strides":
        st["exp_avg"] = st["exp_avg"].t().contiguous().t()
    elif fault == "absmax_shape":
        st["exp_avg_absmax"] = torch.zeros(3)
    elif fault == "step_dtype":
        st["step"] = torch.tensor(3)
    elif fault == "step_value":
        st["step"] = torch.tensor(2.5)


FAULTS = [("grad_shape", "fp32"), ("grad_dtype", "fp32"), ("grad_sparse", "fp32"),
          ("state_shape", "fp32"), ("state_shape", "int8"), ("state_dtype", "fp32"),
          ("int8_strides", "int8"), ("absmax_shape", "int8"), ("step_dtype", "fp32"),
          ("step_value", "int8")]


def _error(backend, fault, fmt):
    torch.manual_seed(0)
    # param 2 is the group's third, but the second of its int8 batch (param 1 keeps fp32 state)
    ps = [torch.randn(s, requires_grad=True) for s in [(64, 80), (34,), (70, 60)]]
    opt = onepass.AdamW([{"params": ps, "param_names": ["a", "b", "c"]}], backend=backend,
                        state_dtype=fmt, min_int8_numel=1000)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    _fault(ps, opt, fault)
    with pytest.raises(Exception) as e:
        opt.step()
    return type(e.value), str(e.value).splitlines()[0]


@pytest.mark.parametrize("fault,fmt", FAULTS)
def test_a_fault_reads_the_same_on_every_backend(fault, fmt):
    want = _error("reference", fault, fmt)
    assert want[1].startswith("onepass: param 2 ('c') of param group 0: "), want
    for backend in BACKENDS_HERE[1:]:
        if backend in BACKENDS:
            assert _error(backend, fault, fmt) == want, backend


@pytest.mark.skipif(not _ops.HAS_EXT, reason="compares the C++ checks with the reference's")
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_low_precision_state_on_a_float64_param_reads_the_same(fmt):
    p = torch.randn(300, dtype=torch.float64)
    m = torch.zeros(300, dtype=torch.bfloat16 if fmt == "bf16" else torch.uint8)
    absmax = [torch.zeros(1, 2)] if fmt == "int8" else []
    batch = Batch(params=[p], grads=[torch.randn_like(p)], exp_avgs=[m], exp_avg_sqs=[m.clone()],
                  max_exp_avg_sqs=[], steps=[torch.tensor(0.0)], lr=1e-3, beta1=0.9,
                  beta2=0.999, eps=1e-8, amsgrad=False, weight_decay=0.0, maximize=False,
                  decoupled=True, grad_scale=None, found_inf=None, device=p.device, scratch={},
                  state_format=fmt, exp_avg_absmaxs=absmax, exp_avg_sq_absmaxs=list(absmax),
                  qtables=onepass.quant.tables(p.device) if fmt == "int8" else None)
    errors = []
    for name in ("reference", "cpu"):
        with pytest.raises(Exception) as e:
            BACKENDS[name].validate(batch)
        errors.append((type(e.value), str(e.value).splitlines()[0]))
    assert errors[0] == errors[1]
    assert errors[0] == (RuntimeError, f"onepass: {fmt} state is for float32/bf16/fp16 params, got Double")
