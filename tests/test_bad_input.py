"""Bad input gets a clear error (torch's wording where torch rejects the same input) and changes
nothing: sparse grads, bad hyperparameters, bad grads.
"""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

from .optimizer_helpers import (CPU_BACKENDS, assert_unchanged, make_grads, make_params, run_steps,
                                set_grads, snapshot)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing changes
# ---------------------------------------------------------------------------------------------------

def _sparse_embedding(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(10, 4, sparse=True)


def _sparse_backward(emb):
    emb.weight.grad = None
    emb(torch.tensor([1, 3, 3])).pow(2).sum().backward()
    assert emb.weight.grad.is_sparse


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "with_state"])
def test_sparse_grad_raises_and_changes_nothing(backend, warm):
    emb = _sparse_embedding()
    opt = onepass.AdamW(emb.parameters(), backend=backend)
    if warm:
        emb.weight.grad = torch.ones_like(emb.weight)
        opt.step()
    _sparse_backward(emb)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_grad_in_second_group_leaves_first_group_untouched(backend):
    emb = _sparse_embedding()
    dense = make_params([(5, 3), (4,)])
    opt = onepass.AdamW([{"params": dense}, {"params": [emb.weight]}], backend=backend)
    set_grads(dense, make_grads(dense, 0))
    emb.weight.grad = torch.ones_like(emb.weight)
    opt.step()
    set_grads(dense, make_grads(dense, 1))
    _sparse_backward(emb)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, snap)


def test_param_group_params_may_be_a_generator():
    # torch.optim accepts {"params": model.parameters()} in a group dict; so must onepass.
    model = torch.nn.Linear(3, 2)
    extra = torch.nn.Linear(2, 2)
    theirs = torch.optim.AdamW([{"params": model.parameters(), "lr": 0.1}])
    ours = onepass.AdamW([{"params": model.parameters(), "lr": 0.1}])
    assert [len(g["params"]) for g in theirs.param_groups] == [2]
    assert [len(g["params"]) for g in ours.param_groups] == [2]
    ours.add_param_group({"params": extra.parameters(), "lr": 0.2})
    assert [len(g["params"]) for g in ours.param_groups] == [2, 2]
    model(torch.randn(4, 3)).sum().backward()
    before = model.weight.detach().clone()
    ours.step()
    assert not torch.equal(model.weight.detach(), before)


def test_complex32_param_rejected_at_construction():
    # complex64/complex128 params are optimized as torch does (tests/test_complex.py); complex32
    # (no full-precision math dtype of its own) is refused like any other unsupported dtype
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))
    with pytest.raises(TypeError, match="complex"):
        onepass.AdamW([p])
    opt = onepass.AdamW(make_params([(3,)]))
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_params_on_two_devices_rejected_at_construction():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="meta"))
    with pytest.raises(ValueError, match="device"):
        onepass.AdamW([a, b])
    # two groups on two devices are fine: the rule is per group
    opt = onepass.AdamW([{"params": [a]}, {"params": [b]}])
    assert len(opt.param_groups) == 2


BAD_HYPERPARAMETERS = [
    ("lr", -1e-3),
    ("betas", (1.0, 0.999)),
    ("betas", (-0.1, 0.999)),
    ("betas", (0.9, 1.0)),
    ("betas", (0.9, -0.1)),
    ("eps", -1e-8),
    ("weight_decay", -1e-2),
    ("lr", float("nan")),
    ("lr", torch.tensor(-1e-3)),
]
BAD_IDS = ["lr<0", "beta1=1", "beta1<0", "beta2=1", "beta2<0", "eps<0", "wd<0", "lr=nan", "tensor_lr<0"]


@pytest.mark.parametrize("cls", [onepass.AdamW, onepass.Adam], ids=["AdamW", "Adam"])
@pytest.mark.parametrize("key,value", BAD_HYPERPARAMETERS, ids=BAD_IDS)
def test_bad_hyperparameter_rejected_at_construction(cls, key, value):
    with pytest.raises(ValueError):
        cls(make_params([(3,)]), **{key: value})
    with pytest.raises(ValueError):
        cls([{"params": make_params([(3,)]), key: value}])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("key,value", BAD_HYPERPARAMETERS, ids=BAD_IDS)
def test_bad_hyperparameter_set_later_fails_step_and_changes_nothing(backend, key, value):
    params = make_params()
    opt = onepass.AdamW([{"params": params[:1]}, {"params": params[1:]}], backend=backend)
    run_steps(opt, params, 2)
    set_grads(params, make_grads(params, 2))
    opt.param_groups[1][key] = value
    snap = snapshot(opt)
    with pytest.raises(ValueError):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "with_state"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_bad_grad_raises_and_changes_nothing(backend, warm, bad):
    params = make_params()
    opt = onepass.AdamW(params, backend=backend)
    if warm:
        run_steps(opt, params, 2)
    set_grads(params, make_grads(params, 5))
    # torch refuses to assign a grad of the wrong shape or dtype to p.grad; swapping the grad's
    # .data gets one past it.
    if bad == "shape":
        params[1].grad.data = torch.randn(4, 4)
        assert params[1].grad.shape != params[1].shape
    else:
        params[1].grad.data = torch.randn(params[1].shape, dtype=torch.float64)
        assert params[1].grad.dtype != params[1].dtype
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match=bad if bad == "shape" else "Double|float64"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_rejects_wrong_grad_dtype_without_writing(backend):
    params = make_params([(5, 3)])
    opt = onepass.AdamW(params, backend=backend)
    run_steps(opt, params, 1)
    st = opt.state[params[0]]
    batch = onepass.backends.Batch(
        params=[params[0].detach()], grads=[torch.randn(5, 3, dtype=torch.float64)],
        exp_avgs=[st["exp_avg"]], exp_avg_sqs=[st["exp_avg_sq"]], max_exp_avg_sqs=[],
        steps=[st["step"]], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
        amsgrad=False, maximize=False, decoupled=True,
    )
    snap = snapshot(opt)
    b = BACKENDS[backend]
    with pytest.raises(RuntimeError):
        b.validate(batch)
    assert_unchanged(opt, snap)
    if b.checks_before_writing:
        with pytest.raises(RuntimeError):
            b.step(batch)
        assert_unchanged(opt, snap)


@pytest.mark.parametrize("key,value", [("lr", "0.1"), ("eps", "1e-8"), ("weight_decay", "0.1"),
                                       ("betas", ("0.9", 0.999))])
def test_a_number_given_as_a_string_is_torchs_type_error(key, value):
    # torch compares (0.0 <= lr) and so refuses a str with a TypeError; onepass must not read it
    with pytest.raises(TypeError) as theirs:
        torch.optim.AdamW(make_params([(3,)]), **{key: value})
    with pytest.raises(TypeError) as ours:
        onepass.AdamW(make_params([(3,)]), **{key: value})
    assert str(ours.value) == str(theirs.value)


def test_a_numpy_integer_seed_is_an_integer():
    np = pytest.importorskip("numpy")
    a, b = make_params([(64,)], dtype=torch.bfloat16), make_params([(64,)], dtype=torch.bfloat16)
    oa = onepass.AdamW(a, seed=np.int64(7), param_rounding="stochastic")
    ob = onepass.AdamW(b, seed=7, param_rounding="stochastic")
    for opt, ps in ((oa, a), (ob, b)):
        ps[0].grad = torch.full((64,), 0.3, dtype=torch.bfloat16)
        opt.step()
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="seed"):
        onepass.AdamW(make_params([(3,)]), seed=np.float64(7.0))
