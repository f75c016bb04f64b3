"""backend="auto" on CUDA tensors, capturable groups, and the CUDA graph capture check of step().

No GPU is needed: backend availability, torch.cuda.is_available and the capture status are
monkeypatched, and the optimizers run over CPU params.
"""
from __future__ import annotations

import re

import pytest
import torch

import onepass
from onepass import capture as capture_mod
from onepass import optimizer as opt_mod
from onepass.backends import _AUTO_ORDER, BACKENDS, auto_candidates, resolve_backend

from ._bits import assert_same_bits

CUDA = torch.device("cuda")

# torch.optim.Optimizer._accelerator_graph_capture_health_check's wording, unchanged
TORCH_CAPTURE_ERROR = ("Attempting CUDA graph capture of step() for an instance of {} but "
                       "param_groups' capturable is False.")


# ---- backend="auto" on CUDA tensors --------------------------------------------------------------

@pytest.fixture
def gpu_backends(monkeypatch):
    """Availability of the triton and cuda backends for CUDA tensors, set by the test."""
    avail = {"triton": True, "cuda": True}

    def reason(name):
        def f(device):
            if device.type != "cuda":
                return f"{name}: not {device.type}"
            return None if avail[name] else f"{name} is not here (test)"
        return f

    for name in avail:
        monkeypatch.setattr(BACKENDS[name], "auto_reason", reason(name))
        monkeypatch.setattr(BACKENDS[name], "unavailable_reason", reason(name))
    return avail


def test_auto_takes_triton_first_on_cuda_tensors(gpu_backends):
    # triton until scripts/gpu_check.sh has passed the CUDA suite on a GPU (see _AUTO_ORDER)
    assert _AUTO_ORDER["cuda"] == ("triton", "cuda", "reference")
    assert [b.name for b in auto_candidates(CUDA)] == ["triton", "cuda", "reference"]
    assert resolve_backend("auto", CUDA).name == "triton"
    gpu_backends["triton"] = False
    assert resolve_backend("auto", CUDA).name == "cuda"
    gpu_backends["cuda"] = False
    assert resolve_backend("auto", CUDA).name == "reference"
    # CPU tensors are unchanged
    assert _AUTO_ORDER["cpu"] == ("cpu", "reference")


def test_cuda_stays_available_by_name(gpu_backends):
    assert resolve_backend("cuda", CUDA).name == "cuda"
    assert opt_mod._group_backend("cuda", CUDA, False).name == "cuda"
    assert opt_mod._group_backend("auto", CUDA, False).name == "triton"


def test_auto_with_capturable_takes_cuda(gpu_backends):
    # triton reads the step count on the host: a capturable group needs the cuda kernels
    assert opt_mod._group_backend("auto", CUDA, True).name == "cuda"
    assert opt_mod._group_backend("cuda", CUDA, True).name == "cuda"
    gpu_backends["triton"] = False
    assert opt_mod._group_backend("auto", CUDA, True).name == "cuda"


def test_auto_with_capturable_without_cuda_says_why(gpu_backends):
    gpu_backends["cuda"] = False
    with pytest.raises(RuntimeError, match=r"capturable=True needs the cuda backend.*"
                                           r"backend='auto' cannot use it here: cuda is not here"):
        opt_mod._group_backend("auto", CUDA, True)
    # (non-capturable groups are unaffected)
    assert opt_mod._group_backend("auto", CUDA, False).name == "triton"


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_capturable_with_another_backend_named_is_an_error(gpu_backends, name):
    with pytest.raises(RuntimeError, match=f"capturable=True needs the cuda backend.*the '{name}' "
                                           "backend reads it on the host"):
        opt_mod._group_backend(name, CUDA, True)


def test_capturable_on_cpu_tensors_keeps_auto_order():
    # capturable changes nothing for CPU tensors (their step counts stay on the host anyway)
    cpu = torch.device("cpu")
    assert opt_mod._group_backend("auto", cpu, True) is resolve_backend("auto", cpu)


# ---- the capture check of step() -----------------------------------------------------------------

class _Capture:
    """Simulated CUDA graph capture: torch.cuda.is_available() says True and the current stream
    is capturing while ``on``; counts the queries."""

    def __init__(self, monkeypatch, available=True):
        self.on = True
        self.available_calls = 0
        self.capturing_calls = 0
        monkeypatch.setattr(torch.cuda, "is_available", self._available)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", self._capturing)
        monkeypatch.setattr(capture_mod, "_CUDA_AVAILABLE", None)  # the cached answer: ask again
        self._answer = available

    def _available(self):
        self.available_calls += 1
        return self._answer

    def _capturing(self):
        self.capturing_calls += 1
        return self.on


@pytest.fixture
def capture(monkeypatch):
    return _Capture(monkeypatch)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((5, 3), (7,))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _snapshot(params, opt):
    out = {f"param {i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"param {i} {k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _assert_unchanged(before, params, opt):
    after = _snapshot(params, opt)
    assert sorted(after) == sorted(before)
    for k, v in before.items():
        assert_same_bits(after[k], v, k)


@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.Adam])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_capturing_a_non_capturable_step_raises_torchs_error(capture, cls, steps_before):
    params = _params()
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    capture.on = False
    for t in range(steps_before):
        _grads(params, t)
        opt.step()
    _grads(params, steps_before)
    before = _snapshot(params, opt)
    assert len(opt.state) == (2 if steps_before else 0)
    capture.on = True
    closure_calls = []
    message = TORCH_CAPTURE_ERROR.format(cls.__name__)
    with pytest.raises(RuntimeError) as err:
        opt.step(lambda: closure_calls.append(1))
    assert str(err.value) == message  # torch's text exactly
    assert closure_calls == []  # refused before the closure runs, as torch does
    _assert_unchanged(before, params, opt)  # no param, moment or step count written, no state made
    if steps_before:
        assert all(float(opt.state[p]["step"]) == steps_before for p in params)
    # uncaptured, the same optimizer steps as before
    capture.on = False
    opt.step()
    assert all(float(opt.state[p]["step"]) == steps_before + 1 for p in params)


def test_one_non_capturable_group_is_enough(capture):
    a, b = _params(0), _params(1)
    opt = onepass.AdamW([{"params": a}, {"params": b, "capturable": False}], capturable=True)
    _grads(a + b, 0)
    before = _snapshot(a + b, opt)
    with pytest.raises(RuntimeError, match="^" + re.escape(TORCH_CAPTURE_ERROR.format("AdamW")) + "$"):
        opt.step()
    _assert_unchanged(before, a + b, opt)
    assert len(opt.state) == 0


def test_capturable_group_with_an_lr_tensor_on_another_device_raises(capture):
    # (on a GPU: CUDA params with a CPU lr Tensor; here CPU params with a meta-device lr)
    params = _params()
    opt = onepass.AdamW(params, lr=torch.tensor(1e-2, device="meta"), capturable=True)
    _grads(params, 0)
    before = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"^onepass: attempting CUDA graph capture of step\(\) with "
                                           r"param group 0's lr a Tensor on meta while its params "
                                           r"are on cpu: the graph would keep the lr read at capture"):
        opt.step()
    _assert_unchanged(before, params, opt)
    assert len(opt.state) == 0


def test_capturable_groups_pass_the_check(capture):
    # capturable=True with the lr as a float or a Tensor on the params' device: the check lets
    # the step through, and it gives the bits of an uncaptured step
    for lr in (1e-2, torch.tensor(1e-2)):
        params, twins = _params(), _params()
        opt = onepass.AdamW(params, lr=lr, capturable=True, backend="reference")
        ref = onepass.AdamW(twins, lr=1e-2, backend="reference")
        for t in range(2):
            _grads(params, t)
            _grads(twins, t)
            capture.on = True
            opt.step()
            capture.on = False
            ref.step()
        for k, v in _snapshot(twins, ref).items():
            assert_same_bits(_snapshot(params, opt)[k], v, k)
    assert capture.capturing_calls >= 4


def test_without_cuda_the_capture_status_is_never_asked(monkeypatch):
    capture = _Capture(monkeypatch, available=False)  # capturing "on", but no CUDA
    params = _params()
    opt = onepass.AdamW(params)
    for t in range(3):
        _grads(params, t)
        opt.step()
    assert capture.capturing_calls == 0
    assert capture.available_calls == 1  # asked once, then cached
    assert float(opt.state[params[0]]["step"]) == 3


def test_cuda_availability_is_asked_once(capture):
    params = _params()
    opt = onepass.AdamW(params, capturable=True)
    for t in range(3):
        _grads(params, t)
        opt.step()
    assert capture.available_calls == 1
    assert capture.capturing_calls == 3


def test_not_checked_while_compiling(capture, monkeypatch):
    # as torch: under torch.compile the compiler decides about CUDA graphs itself
    params = _params()
    opt = onepass.AdamW(params, backend="reference")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _grads(params, 0)
    opt.step()
    assert capture.capturing_calls == 0


def test_a_group_its_backend_cannot_run_leaves_no_new_state(monkeypatch):
    # the error of a backend that lacks a group's format (named, or cuda for a capturable group
    # under "auto") comes after the state was created: the failed step takes it back
    monkeypatch.setattr(type(BACKENDS["reference"]), "state_formats", ("fp32",))
    params = _params()
    _grads(params, 0)
    before = {i: p.detach().clone() for i, p in enumerate(params)}
    opt = onepass.AdamW(params, state_dtype="bf16", min_int8_numel=0, backend="reference")
    with pytest.raises(RuntimeError, match="backend 'reference' cannot run this group: the reference "
                                           "backend has no bf16 state yet"):
        opt.step()
    assert len(opt.state) == 0
    for i, p in enumerate(params):
        assert_same_bits(p, before[i], f"param {i}")
