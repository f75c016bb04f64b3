"""Conformance with torch's own optimizer tests (issue #15, item 5).

torch's test/test_optim.py (TestOptimRenewed over optim_db) draws its cases from
torch.testing._internal.common_optimizers: for Adam and AdamW, ``optim_inputs_func`` (the
hyperparameter configs every test runs, widened by the global flags foreach / fused /
differentiable) and ``optim_error_inputs_func`` (inputs each optimizer must refuse, with the
exception type and a regex of the message). Here onepass.Adam / onepass.AdamW take those same
inputs on the CPU, as a user moving from torch.optim would pass them:

- every optim input runs a few steps on torch's small model and agrees with torch's own optimizer
  (same kwargs) within a tolerance (a different operation order, ARCHITECTURE.md section 2), on
  float32 and float64, one param group and two; every CPU backend gives the reference's bits on
  them, and ``foreach`` / ``fused`` change nothing (onepass accepts and ignores them).
  ``differentiable=True`` is refused by design (the update is not differentiated): those inputs
  assert the refusal instead;
- every error input raises torch's exception type with a message torch's regex matches (at
  construction or at step, as its ``error_on`` says), except the inputs torch refuses only
  because its foreach implementation cannot take them (a Tensor lr / Tensor betas with
  foreach=True): onepass has no foreach path and accepts them, and the test checks that it does;
- a deep copy keeps every public attribute (torch's test_deepcopy_copies_all_public_attrs);
- complex params behave as in torch's test_complex / test_complex_2d.

torch's inputs are read in a subprocess: importing torch.testing._internal.common_utils changes
process-wide state (torch.backends.disable_global_flags, argv parsing) and needs the
``expecttest`` package, which torch's wheels do not require (a stub stands in for it there).
"""
from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

from tests._bits import first_difference

TORCH_CLASSES = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
ONEPASS_CLASSES = {"Adam": onepass.Adam, "AdamW": onepass.AdamW}
CPU_BACKENDS = onepass.available_backends("cpu")
STEPS = 5
# Against torch.optim (another operation order): a few ulp per step, amplified a little by the
# model's nonlinearity; the largest elementwise relative difference measured over all of torch's
# inputs after 5 steps (params and moments) is 2e-6 in float32 and 5e-15 in float64.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}

_READ_TORCH_INPUTS = r'''
import pickle, sys, types, unittest
try:
    import expecttest  # noqa: F401
except ImportError:  # torch.testing._internal.common_utils subclasses expecttest.TestCase
    stub = types.ModuleType("expecttest")
    stub.TestCase = unittest.TestCase
    sys.modules["expecttest"] = stub
import torch
try:
    from torch.testing._internal import common_optimizers as co
except ImportError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)
out = {}
for info in co.optim_db:
    if info.name not in ("Adam", "AdamW"):
        continue
    inputs = co._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    errors = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    out[info.name] = {
        "supports_complex": info.supports_complex,
        "inputs": [(o.desc, o.params, o.kwargs) for o in inputs],
        "errors": [(e.optimizer_error_input.desc, e.optimizer_error_input.params,
                    e.optimizer_error_input.kwargs, e.error_on.name, e.error_type, e.error_regex)
                   for e in errors],
    }
with open(sys.argv[1], "wb") as f:
    pickle.dump(out, f)
'''


@pytest.fixture(scope="module")
def torch_inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch_optim_inputs") / "inputs.pkl"
    proc = subprocess.run([sys.executable, "-c", _READ_TORCH_INPUTS, str(path)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"torch.testing._internal.common_optimizers cannot be imported: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(path, "rb") as f:
        out = pickle.load(f)
    assert set(out) == {"Adam", "AdamW"}
    for name in out:
        assert out[name]["inputs"] and out[name]["errors"], name
    return out


# ---- torch's model and loop (test_optim.py: test_foreach_matches_forloop and friends) -----------------

def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                               torch.nn.Sigmoid()).to(dtype)


def _param_spec(model, layout):
    """One group of every param, or two: weights, and biases with their own lr and no decay (as
    torch's test_param_groups_lr / test_param_groups_weight_decay)."""
    params = list(model.parameters())
    if layout == "one_group":
        return params
    return [{"params": params[0::2]}, {"params": params[1::2], "lr": 0.01, "weight_decay": 0.0}]


def _kwargs(kwargs):
    # a fresh copy per optimizer: a Tensor lr is the group's own (schedulers write it in place)
    return {k: (v.clone() if isinstance(v, torch.Tensor) else
                tuple(b.clone() if isinstance(b, torch.Tensor) else b for b in v) if isinstance(v, tuple)
                else v) for k, v in kwargs.items()}


def _run(cls, kwargs, dtype, layout, steps=STEPS, **extra):
    """Runs ``steps`` closure-free steps (zero_grad, forward, sum, backward, step) and returns a
    snapshot after each: params, then each param's state tensors by key."""
    model = _model(dtype)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    opt = cls(_param_spec(model, layout), **_kwargs(kwargs), **extra)
    params = list(model.parameters())
    snaps = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        snap = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
        for i, p in enumerate(params):
            for k, v in opt.state[p].items():
                snap[f"param{i}.{k}"] = v.detach().clone()
        snaps.append(snap)
    return opt, snaps


def _compare(got, want, how, what):
    """Mismatches between two runs' snapshots: bits (how="bits") or torch's tolerance."""
    problems = []
    for step, (g, w) in enumerate(zip(got, want), 1):
        if set(g) != set(w):
            problems.append(f"{what}: step {step}: state keys {sorted(g)} vs {sorted(w)}")
            continue
        for k in w:
            if how == "bits":
                diff = first_difference(g[k], w[k])
                if diff is not None:
                    problems.append(f"{what}: step {step}: {k}: {diff}")
            else:
                try:
                    torch.testing.assert_close(g[k].to(w[k].dtype), w[k], **how)
                except AssertionError as e:
                    problems.append(f"{what}: step {step}: {k}: {str(e).splitlines()[0:4]}")
    return problems


_GLOBAL_FLAGS = ("foreach", "fused", "differentiable")


def _is_differentiable(kwargs):
    return bool(kwargs.get("differentiable"))


def _variant_flags(kwargs):
    return {k: kwargs.get(k) for k in _GLOBAL_FLAGS}


def _strip(kwargs):
    """The kwargs without torch's global flags (foreach / fused / differentiable)."""
    return {k: v for k, v in kwargs.items() if k not in _GLOBAL_FLAGS}


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_optim_inputs_agree_with_torch(torch_inputs, name, dtype):
    """Every optim input of torch's test suite (and its foreach / fused / differentiable
    variants), on torch's model: onepass (backend="auto") within tolerance of torch's own
    optimizer with the same kwargs after every step; foreach / fused change no bit."""
    problems = []
    seen = 0
    base_runs = {}
    for desc, params, kwargs in torch_inputs[name]["inputs"]:
        assert params is None, desc  # torch's inputs leave the params to the test
        what = f"{name}({desc}, {kwargs})"
        if _is_differentiable(kwargs):
            # refused by design: onepass's update is not differentiated (README, Usage)
            with pytest.raises(ValueError, match="differentiable"):
                ONEPASS_CLASSES[name](_model(dtype).parameters(), **_kwargs(kwargs))
            continue
        for layout in ("one_group", "two_groups"):
            _, theirs = _run(TORCH_CLASSES[name], kwargs, dtype, layout)
            opt, ours = _run(ONEPASS_CLASSES[name], kwargs, dtype, layout)
            assert opt.last_backends == ["cpu" if "cpu" in CPU_BACKENDS else "reference"]
            problems += _compare(ours, theirs, TOL[dtype], f"{what} [{layout}] vs torch")
            # foreach / fused are accepted and ignored: every variant gives the base's bits
            key = (repr(sorted(_strip(kwargs).items())), layout)
            if key in base_runs:
                problems += _compare(ours, base_runs[key], "bits", f"{what} [{layout}] vs base")
            else:
                base_runs[key] = ours
            seen += 1
    assert not problems, "\n".join(problems[:20])
    # (torch 2.13: 5 configs x (base, foreach, fused) x 2 layouts)
    assert seen >= 2 * len({repr(sorted(_strip(k).items())) for _, _, k in torch_inputs[name]["inputs"]})


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_optim_inputs_every_backend_gives_reference_bits(torch_inputs, name):
    """torch's configs on every CPU backend (the triton interpreter and the emulated cuda kernels
    included where present): the reference's bits after every step."""
    problems = []
    base = [(d, k) for d, _, k in torch_inputs[name]["inputs"]
            if not any(_variant_flags(k).values())]
    assert base, "no base configs among torch's inputs"
    for desc, kwargs in base:
        for dtype in (torch.float32, torch.float64):
            for layout in ("one_group", "two_groups"):
                _, ref = _run(ONEPASS_CLASSES[name], kwargs, dtype, layout, backend="reference")
                for backend in CPU_BACKENDS:
                    if backend == "reference":
                        continue
                    opt, got = _run(ONEPASS_CLASSES[name], kwargs, dtype, layout, backend=backend)
                    assert opt.last_backends == [backend]
                    problems += _compare(got, ref, "bits",
                                         f"{name}({desc}) {dtype} [{layout}] {backend} vs reference")
    assert not problems, "\n".join(problems[:20])


# ---- error inputs ---------------------------------------------------------------------------------

def _foreach_only(kwargs, regex):
    """torch refuses these only because its foreach implementation cannot take them (a Tensor lr
    or Tensor betas with foreach=True and capturable=False); onepass has no foreach path."""
    return bool(kwargs.get("foreach")) and "foreach=True" in regex


def _expect(error_type, regex):
    if issubclass(error_type, Warning):
        return pytest.warns(error_type, match=regex)
    return pytest.raises(error_type, match=regex)


def _params_like_torch(params):
    return params if params is not None else [torch.nn.Parameter(torch.randn(2, 3))]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_error_inputs_raise_torchs_errors(torch_inputs, name):
    """Each of torch's error inputs: torch's exception type, a message its regex matches (onepass
    may prefix its own words), raised where torch raises it (construction or step). With
    torch's params (None where torch leaves them out, as test_optim.py's test_errors passes
    them) and with real params; the hyperparameter errors also when a param group carries the
    bad value, and when it is set in a group later (then step() raises)."""
    cls = ONEPASS_CLASSES[name]
    checked = accepted = 0
    for desc, params, kwargs, error_on, error_type, regex in torch_inputs[name]["errors"]:
        if _foreach_only(kwargs, regex):
            # accepted: a Tensor lr / Tensor betas is fine without foreach, which onepass ignores
            model = _model(torch.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt = cls(model.parameters(), **_kwargs(kwargs))
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
            _, ours = _run(cls, kwargs, torch.float32, "one_group", steps=2)
            plain = {k: v for k, v in kwargs.items() if k != "foreach"}
            _, theirs = _run(TORCH_CLASSES[name], plain, torch.float32, "one_group", steps=2)
            assert not _compare(ours, theirs, TOL[torch.float32], desc)
            accepted += 1
            continue
        variants = [params]
        if params is None:
            variants.append(_params_like_torch(None))
        for ps in variants:
            if error_on == "CONSTRUCTION_ERROR":
                with _expect(error_type, regex):
                    cls(ps, **_kwargs(kwargs))
            else:
                assert error_on == "STEP_ERROR", error_on
                opt = cls(ps, **_kwargs(kwargs))
                with _expect(error_type, regex):
                    opt.step()
        if params is None and set(kwargs) <= {"lr", "betas", "eps", "weight_decay"}:
            p = torch.nn.Parameter(torch.randn(2, 3))
            with _expect(error_type, regex):
                cls([{"params": [p], **_kwargs(kwargs)}])
            opt = cls([p])
            p.grad = torch.randn_like(p)
            for k, v in _kwargs(kwargs).items():
                opt.param_groups[0][k] = v
            before = p.detach().clone()
            with _expect(error_type, regex):
                opt.step()
            assert torch.equal(p.detach(), before) and not opt.state
        checked += 1
    assert checked >= 8 and accepted >= 2, (checked, accepted)


@pytest.mark.parametrize("cls", [onepass.Adam, onepass.AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("kwargs,error,regex", [
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(-1.0)), ValueError, re.escape("Invalid learning rate: -1.0")),
    (dict(lr=-0.5), ValueError, re.escape("Invalid learning rate: -0.5")),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
    (dict(eps=-1e-3), ValueError, re.escape("Invalid epsilon value: -0.001")),
    (dict(betas=(0.9, 1.0)), ValueError, re.escape("Invalid beta parameter at index 1: 1.0")),
    (dict(betas=(-0.1, 0.9)), ValueError, re.escape("Invalid beta parameter at index 0: -0.1")),
    (dict(betas=(torch.tensor(1.0), torch.tensor(0.9))), ValueError,
     re.escape("Invalid beta parameter at index 0: 1.0")),
    (dict(betas=(torch.tensor(0.9), 0.99)), ValueError, "betas must be either both floats or both Tensors"),
    (dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
], ids=["tensor_lr_2", "tensor_lr<0", "lr<0", "lr=nan", "eps<0", "beta2=1", "beta1<0",
        "tensor_beta1=1", "mixed_betas", "wd<0"])
def test_bad_hyperparameters_get_torchs_type_and_words(cls, kwargs, error, regex):
    """Inputs both torch and onepass refuse, beyond torch's error inputs: torch's type and words
    (asserted against torch itself first)."""
    torch_cls = torch.optim.Adam if cls is onepass.Adam else torch.optim.AdamW
    with pytest.raises(error, match=regex):
        torch_cls([torch.nn.Parameter(torch.randn(2))], **_kwargs(kwargs))
    with pytest.raises(error, match=regex):
        cls([torch.nn.Parameter(torch.randn(2))], **_kwargs(kwargs))


@pytest.mark.parametrize("cls", [onepass.Adam, onepass.AdamW], ids=["Adam", "AdamW"])
def test_onepass_accepts_what_torch_refuses_by_accident(cls):
    """torch checks ``isinstance(beta, float)``, so betas=(0, 0.99) is refused there ("betas
    must be either both floats or both Tensors"); numbers of any kind are fine here, and a
    0-dim or 1-element Tensor lr / Tensor betas pair works without foreach as with it."""
    p = torch.nn.Parameter(torch.randn(3))
    for kwargs in (dict(betas=(0, 0.99)), dict(lr=torch.tensor([1e-3]), foreach=True),
                   dict(betas=(torch.tensor([0.9]), torch.tensor(0.99)), foreach=True)):
        opt = cls([p], **kwargs)
        p.grad = torch.randn_like(p)
        opt.step()


# ---- deepcopy (torch's test_deepcopy_copies_all_public_attrs) ---------------------------------------

@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_all_public_attrs(torch_inputs, name, how):
    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for desc, _, kwargs in torch_inputs[name]["inputs"]:
        if _is_differentiable(kwargs):
            continue  # refused (torch's test skips differentiable too)
        opt = ONEPASS_CLASSES[name](params, **_kwargs(kwargs))
        for _ in range(3):
            opt.step()
        copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
        assert public(copied) == public(opt), desc
        assert "last_backends" in public(copied) and copied.last_backends == opt.last_backends
        assert copied._step_supports_amp_scaling  # GradScaler hands a copy its scale too


# ---- complex params (torch's test_complex and test_complex_2d) ------------------------------------

def _rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_complex_as_torch_tests_it(torch_inputs, name):
    """torch's test_complex: a complex param and its view_as_real twin (a real param) take the
    same steps (here: the same bits); test_complex_2d: a complex param of rosenbrock's two
    coordinates and the real and imaginary parts as two real params."""
    assert torch_inputs[name]["supports_complex"]
    cls = ONEPASS_CLASSES[name]
    for desc, _, kwargs in torch_inputs[name]["inputs"]:
        if _is_differentiable(kwargs):
            continue
        torch.manual_seed(0)
        # (the last param is real, as in torch's test: real and complex params mix in a group)
        complex_params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, 5, dtype=torch.float32, requires_grad=True)]
        real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                       for p in complex_params]
        complex_opt = cls(complex_params, **_kwargs(kwargs))
        real_opt = cls(real_params, **_kwargs(kwargs))
        for _ in range(3):
            for c, r in zip(complex_params, real_params):
                r.grad = torch.randn_like(r)
                c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
            complex_opt.step()
            real_opt.step()
            for c, r in zip(complex_params, real_params):
                real_view = torch.view_as_real(c.detach()) if c.is_complex() else c.detach()
                assert first_difference(real_view, r.detach()) is None, desc
                for k, v in real_opt.state[r].items():
                    cs = complex_opt.state[c][k]
                    if c.is_complex() and k != "step":
                        assert cs.dtype == torch.complex64 and cs.shape == c.shape, k
                        cs = torch.view_as_real(cs)
                    assert first_difference(cs, v) is None, (desc, k)

        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real = a1.real.clone().detach().requires_grad_()
        a1_imag = a1.imag.clone().detach().requires_grad_()
        opt1 = cls([a1], **_kwargs(kwargs))
        opt2 = cls([a1_real, a1_imag], **_kwargs(kwargs))
        for _ in range(10):
            opt1.zero_grad()
            opt2.zero_grad()
            a2 = torch.complex(a1_real, a1_imag)
            _rosenbrock(a1).abs().backward()
            _rosenbrock(a2).abs().backward()
            torch.testing.assert_close(a1.grad.real, a1_real.grad)
            torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
            opt1.step()
            opt2.step()
            torch.testing.assert_close(a1.real, a1_real)
            torch.testing.assert_close(a1.imag, a1_imag)
