"""The Triton backend: what is particular to it (one launch per group and dtype, layouts, step
counts, checks before writing). Bit-exactness for every dtype and option is in test_matrix.py.

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors; with one,
on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_why = BACKENDS["triton"].unavailable_reason(torch.device(DEVICE))
if _why is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"triton backend unavailable here: {_why}")]


def _run(backend, make_params, steps=3, grads_for=None, **kw):
    params = make_params()
    opt = onepass.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    gen = torch.Generator().manual_seed(21)
    for s in range(steps):
        for j, p in enumerate(params):
            use = grads_for is None or grads_for(s, j)
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.grad = g.to(p.device) if use else None
        opt.step()
    out = [p.detach().cpu().clone() for p in params]
    for p in params:
        out += [opt.state[p][k].cpu().clone() for k in sorted(opt.state.get(p, {}))]
    return out


def _same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _on(device):
    def make(tensors):
        return lambda: [torch.nn.Parameter(t.to(device)) for t in tensors()]
    return make


def test_one_launch_per_group_for_many_tensors(monkeypatch):
    from onepass.backends import triton as tb

    kernels = tb._load()
    tb.config_for(torch.device(DEVICE))  # on a GPU, the one-time tuning launches come first
    real = kernels.adam_kernel
    launches = []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "adam_kernel", Counting())
    tensors = lambda: [_rand(37 + i, seed=i) for i in range(300)]  # noqa: E731
    got = _run("triton", _on(DEVICE)(tensors), steps=2)
    assert len(launches) == 2  # 300 tensors, 2 steps: one launch each
    assert _same(got, _run("reference", _on("cpu")(tensors), steps=2))


def test_mixed_dtypes_in_one_group():
    tensors = lambda: [_rand(50, seed=1), _rand(70, seed=2).double(), _rand(33, seed=3).bfloat16(),  # noqa: E731
                       _rand(20, seed=4).half()]
    assert _same(_run("triton", _on(DEVICE)(tensors), amsgrad=True),
                 _run("reference", _on("cpu")(tensors), amsgrad=True))


def test_non_contiguous_params_and_grads():
    def make(device):
        def f():
            strided = _rand(16, 40, seed=3).to(device)[:, ::2]   # a view with gaps
            transposed = _rand(12, 9, seed=4).to(device).t()      # dense, not contiguous
            assert not strided.is_contiguous() and not transposed.is_contiguous()
            return [torch.nn.Parameter(x) for x in (strided, transposed, _rand(5, 6, seed=5).to(device))]
        return f

    got = _run("triton", make(DEVICE))
    assert _same(got, _run("reference", make("cpu")))


def test_params_with_different_step_counts():
    tensors = lambda: [_rand(100, seed=6), _rand(60, seed=7), _rand(30, seed=8)]  # noqa: E731
    only_first_early = lambda s, j: s >= 2 or j == 0  # noqa: E731
    got = _run("triton", _on(DEVICE)(tensors), steps=4, grads_for=only_first_early)
    want = _run("reference", _on("cpu")(tensors), steps=4, grads_for=only_first_early)
    assert _same(got, want)


def test_bad_grad_raises_before_anything_is_written():
    p = torch.nn.Parameter(torch.randn(10, device=DEVICE))
    q = torch.nn.Parameter(torch.randn(8, device=DEVICE))
    opt = onepass.AdamW([p, q], backend="triton")
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    before = [p.detach().clone(), q.detach().clone()] + [t.clone() for st in opt.state.values() for t in st.values()]
    p.grad = torch.randn_like(p)
    q.grad.data = torch.randn(8, dtype=torch.float64, device=DEVICE)  # wrong dtype behind torch's back
    with pytest.raises((RuntimeError, TypeError), match="grads\\[1\\]|grad"):
        opt.step()
    after = [p.detach().clone(), q.detach().clone()] + [t.clone() for st in opt.state.values() for t in st.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = BACKENDS["triton"].unavailable_reason(torch.device("cpu"))
    assert why is not None and "TRITON_INTERPRET" in why
    with pytest.raises(RuntimeError, match="unavailable"):
        p = torch.nn.Parameter(torch.ones(2))
        p.grad = torch.ones(2)
        onepass.AdamW([p], backend="triton").step()


def test_host_path_without_the_compiled_helpers(monkeypatch):
    # The backend's C++ helpers (pair_table, bump_steps) are optional: without the extension the
    # same tables are built in Python, with the same checks and the same bits.
    from onepass import _ops

    monkeypatch.setattr(_ops, "HAS_EXT", False)
    tensors = lambda: [_rand(40, seed=9), _rand(3, 5, seed=10).double()]  # noqa: E731
    assert _same(_run("triton", _on(DEVICE)(tensors)), _run("reference", _on("cpu")(tensors)))
    p = torch.nn.Parameter(torch.randn(4, device=DEVICE))
    opt = onepass.AdamW([p], backend="triton")
    p.grad = torch.randn(4, device=DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not opt.state.get(p)


def test_tuning_measures_every_config_and_keeps_the_fastest(monkeypatch):
    from onepass.backends import triton as tb

    if DEVICE == "cuda":
        assert tb._tune(torch.device("cuda"), numel=1 << 20, reps=2) in tb.CONFIGS
        return
    # Under the interpreter the timings mean nothing: give each config a made-up time (the last
    # config fastest) and check every one was launched and the fastest kept.
    times = iter(range(1000, 0, -1))

    class FakeEvent:
        def __init__(self, **kw):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return float(next(times))

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    assert tb._tune(torch.device("cpu"), numel=3000, reps=2) == tb.CONFIGS[-1]
    assert tb.config_for(torch.device("cpu")) == (tb.BLOCK, tb.NUM_WARPS)


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_the_compiled_step_table_equals_the_torch_one(fmt):
    # csrc/triton_table.cpp against the torch-ops table an install without the extension builds:
    # the same float64 words and the same non-contiguous rows, for a launch of some of the
    # params (two dtypes), params whose counts differ, and a transposed grad.
    from onepass import _ops
    from onepass.backends import triton as tb
    from onepass.backends import triton_tables as tt
    from onepass.backends.base import Batch

    if not _ops.HAS_EXT:
        pytest.skip("the compiled table needs the extension")
    params = [torch.nn.Parameter(_rand(33, 5, seed=1).to(DEVICE)),
              torch.nn.Parameter(_rand(7, seed=2).to(DEVICE).double()),
              torch.nn.Parameter(_rand(40, seed=3).to(DEVICE))]
    if fmt == "bf16":
        params[1] = torch.nn.Parameter(_rand(7, seed=2).to(DEVICE).bfloat16())
    opt = onepass.AdamW(params, lr=1e-2, backend="triton", state_dtype=fmt)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[params[2]]["step"].fill_(123455.0)  # a count of its own (and many bits of pow)
    params[0].grad = _rand(5, 33, seed=4).to(DEVICE).t()  # transposed
    batch = Batch(
        params=params, grads=[p.grad for p in params],
        exp_avgs=[opt.state[p]["exp_avg"] for p in params],
        exp_avg_sqs=[opt.state[p]["exp_avg_sq"] for p in params], max_exp_avg_sqs=[],
        steps=[opt.state[p]["step"] for p in params], lr=3e-3, beta1=0.9, beta2=0.999,
        eps=1e-8, amsgrad=False, weight_decay=0.01, maximize=False, decoupled=True,
        grad_scale=None, found_inf=None, device=torch.device(DEVICE), scratch={},
        state_format=fmt, exp_avg_absmaxs=[], exp_avg_sq_absmaxs=[], qtables=None,
        param_rounding="nearest", kahan_comps=[], seed=7, stats=None, plan=None)
    plan = tb._Plan(batch)
    assert len(plan.groups) == 2  # float32 (params 0 and 2), then the other dtype
    counts = tt._next_counts(batch)
    assert sorted(counts) == [2, 123456]
    for group in plan.groups:
        got, got_odd = tt._step_table(batch, plan, group)
        want, want_odd = tt._step_table_torch(
            batch, group[3], group[2],
            [tt._correction(t, 0.9, 0.999, onepass.reference.math_dtype(group[0]),
                            7 if plan.wide else None) for t in counts],
            tt.KEY_COL if plan.wide else -1, [3e-3, 0.9, 0.999, 1e-8, 0.01], False)
        assert torch.equal(got.cpu().view(torch.int64), want.view(torch.int64))
        assert got_odd == want_odd
    assert tt._step_table(batch, plan, plan.groups[0])[1] == [0]  # the transposed grad


@pytest.mark.parametrize("layout", ["one launch", "two dtypes", "empty param"])
def test_a_bad_count_raises_before_any_count_moves(layout):
    # The counts advance in the table's C++ call when one launch has every param, else after
    # every table: a bad count in the last param still leaves every count (and all else) as it was.
    from tests.optimizer_helpers import assert_unchanged, snapshot

    params = [torch.nn.Parameter(_rand(9, seed=i).to(DEVICE)) for i in range(3)]
    if layout == "two dtypes":
        params[1] = torch.nn.Parameter(_rand(9, seed=1).to(DEVICE).double())
    if layout == "empty param":
        params[2] = torch.nn.Parameter(torch.zeros(0, device=DEVICE))
    opt = onepass.AdamW(params, lr=1e-2, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state[params[2]]["step"].fill_(1.5)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="whole number"):
        opt.step()
    assert_unchanged(opt, snap)
    opt.state[params[2]]["step"].fill_(1.0)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("fmt,dtype,rounding", [
    ("fp32", torch.float32, "nearest"), ("int8", torch.float32, "nearest"),
    ("bf16", torch.bfloat16, "stochastic")], ids=["fp32", "int8", "bf16-sr"])
def test_found_inf_is_read_on_the_device_and_the_counts_settle_later(fmt, dtype, rounding):
    # Under a GradScaler the kernels read found_inf themselves; the host counts advance with
    # the table and go back at the next settle when the step was skipped. Every step, read
    # through opt.state (which settles), equals the reference's, whose step decides on the host.
    from onepass.backends.triton import SkippedCounts

    def make():
        return [torch.nn.Parameter(_rand(300, seed=1).to(DEVICE, dtype)),
                torch.nn.Parameter(_rand(64, 70, seed=2).to(DEVICE, dtype))]  # (int8 state: >= 4096)

    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=fmt, param_rounding=rounding, seed=5)
    ours, ref = make(), make()
    opt = onepass.AdamW(ours, backend="triton", **kw)
    want = onepass.AdamW(ref, backend="reference", **kw)
    for s, skip in enumerate([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]):
        for a, b in zip(ours, ref):
            g = _rand(*reversed(a.shape), seed=10 + s).to(DEVICE, dtype)
            a.grad = g.t() if a.dim() == 2 else g  # (a transposed grad: not contiguous)
            b.grad = a.grad.clone()
        for o in (opt, want):
            o.grad_scale = torch.tensor(4.0, device=DEVICE)
            o.found_inf = torch.tensor(skip, device=DEVICE)
        count = opt.state[ours[0]]["step"] if s else None  # (the tensor: reading it settles nothing)
        before = float(count) if s else 0.0
        opt.step()
        want.step()
        # (one a batch: int8 keeps the 300-element param in fp32, a batch of its own)
        assert opt._deferred and all(isinstance(d, SkippedCounts) for d in opt._deferred)
        count = dict.__getitem__(opt.state, ours[0])["step"]  # (not a settling read)
        assert float(count) == before + 1  # advanced, whatever found_inf says, until settled
        for a, b in zip(ours, ref):
            assert torch.equal(a.detach(), b.detach())
            sa, sb = opt.state[a], want.state[b]  # (settles)
            assert sorted(sa) == sorted(sb)
            for key in sa:
                assert torch.equal(sa[key].cpu(), sb[key].cpu()), (s, key)
        assert not opt._deferred
        assert float(count) == before + (skip == 0.0)
