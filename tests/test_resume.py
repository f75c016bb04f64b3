"""Resume determinism: train K steps, torch.save model + optimizer + scheduler (+ GradScaler)
state dicts, load them in a FRESH Python process, train M more steps: params, every optimizer
state tensor, step counts, the scheduler's lr and the scaler's scale equal (torch.equal) an
uninterrupted K + M step run.

A fresh process is what a real resume is: nothing cached in onepass (batch lists, quant
tables, Triton plans, the state epoch) can carry a bit from the first run into the second. One
subprocess runs every case, to keep the cost down (~one onepass import).

The "model" is a sum of elementwise products with fixed data, loss = sum(p * G(step)), so the
gradient is exactly G(step) (times the scaler's power-of-two scale) in every process.
This file is also the worker: ``python tests/test_resume.py DIR`` resumes every case saved
in DIR.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

import onepass
from onepass.backends import BACKENDS

K, M = 3, 3
# (8, 300): int8 blocks of 256 within dim-0 rows, with a partial block per row; 300 elements
# of a 1-dim tensor keep fp32 state under int8 (a batch of each format in one step)
SHAPES = [(8, 300), (300,)]

FORMATS = {
    "fp32": (torch.float32, dict()),
    "bf16_state": (torch.float32, dict(state_dtype="bf16")),
    "int8": (torch.float32, dict(state_dtype="int8", min_int8_numel=0)),
    "bf16_params_stochastic": (torch.bfloat16, dict(param_rounding="stochastic", seed=11)),
    "bf16_params_kahan": (torch.bfloat16, dict(param_rounding="kahan")),
}
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def unavailable(backend):
    """None when ``backend`` can run here, else why not (the test's skip reason)."""
    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU here"
    return BACKENDS[backend].auto_reason(torch.device(_device(backend)))


def cases():
    """(name, backend, format, scaler) for every case; one GradScaler case per backend."""
    out = [(f"{b}-{f}", b, f, False) for b in BACKEND_NAMES for f in FORMATS]
    out += [(f"{b}-fp32-gradscaler", b, "fp32", True) for b in BACKEND_NAMES]
    return out


class Model(torch.nn.Module):
    def __init__(self, dtype, device):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(device)) for s in SHAPES])

    def loss(self, step):
        # grad of p is exactly G(step): fixed data, elementwise, no reduction over p's grad
        gen = torch.Generator().manual_seed(1000 + step)
        total = 0
        for p in self.ps:
            g = torch.randn(p.shape, generator=gen)
            if step == K + 1:  # a spike that the scaler's growth must not hide
                g[0] *= 50
            total = total + (p * g.to(p.dtype).to(p.device)).sum().float()
        return total


def build(backend, fmt, scaler):
    dtype, kw = FORMATS[fmt]
    device = _device(backend)
    model = Model(dtype, device)
    opt = onepass.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1, backend=backend, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=K + M + 2, eta_min=1e-3)
    amp = None
    if scaler:
        # growth_interval=2 so the scale moves within the run; the step with an inf grad
        # (see train) halves it and is skipped
        amp = torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=2)
    return model, opt, sched, amp


def train(model, opt, sched, amp, steps):
    for step in steps:
        loss = model.loss(step)
        if amp is None:
            loss.backward()
            opt.step()
        else:
            amp.scale(loss).backward()
            if step == 1:  # an overflow before the save: the scaler skips this step
                model.ps[1].grad[3] = float("inf")
            amp.step(opt)
            amp.update()
        opt.zero_grad(set_to_none=True)
        sched.step()


def result(model, opt, sched, amp):
    """Everything that must match, as CPU tensors and numbers."""
    out = {"params": [p.detach().cpu() for p in model.ps]}
    state = opt.state_dict()["state"]
    out["state"] = {pid: {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                          for k, v in st.items()} for pid, st in state.items()}
    out["lr"] = [g["lr"] for g in opt.param_groups]
    out["sched"] = sched.state_dict()
    out["scale"] = amp.get_scale() if amp is not None else None
    return out


def _resume_all(folder):
    """The worker (a fresh process): load every saved case, train M more steps, save results."""
    results = {}
    for name, backend, fmt, scaler in cases():
        path = os.path.join(folder, name + ".pt")
        if not os.path.exists(path):
            continue
        saved = torch.load(path, weights_only=False)
        model, opt, sched, amp = build(backend, fmt, scaler)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        if amp is not None:
            amp.load_state_dict(saved["amp"])
        train(model, opt, sched, amp, range(K, K + M))
        results[name] = result(model, opt, sched, amp)
    torch.save(results, os.path.join(folder, "resumed.pt"))


if __name__ == "__main__":
    _resume_all(sys.argv[1])
    sys.exit(0)


# ---- the tests --------------------------------------------------------------------------------------
import pytest  # noqa: E402  (the worker above needs no pytest)

_CASES = cases()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (uninterrupted result, resumed result)} for every case that can run here."""
    folder = str(tmp_path_factory.mktemp("resume"))
    straight = {}
    for name, backend, fmt, scaler in _CASES:
        if unavailable(backend) is not None:
            continue
        model, opt, sched, amp = build(backend, fmt, scaler)
        train(model, opt, sched, amp, range(K))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "amp": amp.state_dict() if amp else None},
                   os.path.join(folder, name + ".pt"))
        train(model, opt, sched, amp, range(K, K + M))
        straight[name] = result(model, opt, sched, amp)
    # one fresh interpreter for all cases; it inherits TRITON_INTERPRET (tests/conftest.py)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), folder],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = torch.load(os.path.join(folder, "resumed.pt"), weights_only=False)
    return {name: (straight[name], resumed.get(name)) for name in straight}


def _equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name,backend,fmt,scaler", _CASES, ids=[c[0] for c in _CASES])
def test_resume_in_a_fresh_process_gives_uninterrupted_bits(runs, name, backend, fmt, scaler):
    why = unavailable(backend)
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")
    straight, resumed = runs[name]
    assert resumed is not None, f"the worker did not resume {name}"
    _equal(resumed, straight, name)
    # the run really trained: K + M steps counted (minus the scaler's skipped one), lr scheduled
    want = K + M - (1 if scaler else 0)
    assert all(float(st["step"]) == want for st in straight["state"].values())
    assert straight["lr"][0] != 3e-2
    if scaler:
        assert straight["scale"] != 2.0 ** 10
