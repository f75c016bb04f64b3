"""Fused update statistics: ‖w‖ and ‖Δw‖ from inside the update pass, bit-exact on every backend."""
import math

import pytest
import torch
from torch import nn

import onepass
from onepass import _ops, reference
from onepass.backends import BACKENDS

# (dtype, state_dtype, param_rounding)
FORMATS = [
    (torch.float32, "fp32", "nearest"),
    (torch.float64, "fp32", "nearest"),
    (torch.float16, "fp32", "nearest"),
    (torch.bfloat16, "fp32", "nearest"),
    (torch.float32, "bf16", "nearest"),
    (torch.float32, "int8", "nearest"),
    (torch.bfloat16, "int8", "stochastic"),
    (torch.bfloat16, "bf16", "kahan"),
]
# empty, one element, a prime, several 2048-element chunks with a tail, an int8 weight whose rows
# are not whole 256-blocks (row padding), and one whose grad comes transposed
SHAPES = [(0,), (1,), (97,), (2 * 2048 + 77,), (19, 300), (64, 72)]


def _backends():
    out = []
    for name in onepass.available_backends("cpu"):
        if name == "reference" or not BACKENDS[name].statistics:
            continue
        marks = [pytest.mark.triton] if name == "triton" else []
        out.append(pytest.param(name, marks=marks))
    return out


def _params(dtype, shapes=SHAPES):
    gen = torch.Generator().manual_seed(5)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.shape[::-1], generator=gen, dtype=torch.float64).to(p.dtype)
        p.grad = g.t() if p.dim() == 2 else g.reshape(p.shape)


def _opt(params, backend, fmt, rounding, **kw):
    return onepass.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, statistics=True,
                         state_dtype=fmt, param_rounding=rounding, min_int8_numel=256, **kw)


def _sums(opt):
    return torch.cat([s.cpu() for _, s in opt._last_stats])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,fmt,rounding", FORMATS, ids=lambda x: str(x).replace("torch.", ""))
def test_backend_statistics_equal_reference(backend, dtype, fmt, rounding):
    shapes = SHAPES if backend != "triton" else [(0,), (97,), (2048 + 77,), (5, 300)]
    cand, ref = _params(dtype, shapes), _params(dtype, shapes)
    oc, orf = _opt(cand, backend, fmt, rounding), _opt(ref, "reference", fmt, rounding)
    for step in range(3):
        _grads(cand, step)
        _grads(ref, step)
        oc.step()
        orf.step()
        got, want = _sums(oc), _sums(orf)
        assert torch.equal(got, want), (step, got, want)
        assert torch.isfinite(got).all() and (got[1:, 0] > 0).all()
        for a, b in zip(cand, ref):
            assert torch.equal(a.detach(), b.detach())


def test_reference_statistics_are_the_sums_of_squares():
    # not bit-exact with torch's own sum (another order), but the same numbers to ~1e-6
    params = _params(torch.float32)
    opt = _opt(params, "reference", "fp32", "nearest")
    before = [p.detach().clone() for p in params]
    _grads(params, 0)
    opt.step()
    for (w0, p), row in zip(zip(before, params), _sums(opt)):
        w = p.detach().double()
        d = (p.detach() - w0).double()
        assert row[0].item() == pytest.approx((w * w).sum().item(), rel=1e-6, abs=0)
        assert row[1].item() == pytest.approx((d * d).sum().item(), rel=1e-5, abs=0)


def test_chunk_order_is_rows_then_the_halving_tree():
    # values where the order of additions shows: the tree adds x[i] + x[i + h]
    x = torch.tensor([1e8, 1.0, -1e8, 1.0], dtype=torch.float32)
    assert reference.chunk_partials(x, 4).item() == 2.0  # (1e8 + -1e8) + (1 + 1)
    seq = torch.tensor(0.0, dtype=torch.float32)
    for v in x:
        seq = seq + v
    assert seq.item() == 1.0  # a sequential float32 sum loses one of the ones
    # chunks are zero-padded and summed in float64 in order
    y = torch.arange(1, 6, dtype=torch.float32)
    assert reference.chunk_partials(y, 2).tolist() == [3.0, 7.0, 5.0]
    assert reference.sequential_sum(torch.tensor([1e16, 1.0, -1e16])) == 0.0
    # rows of `lanes` first, added in order lane by lane, then the tree over the lanes:
    # rows [1e8, 1], [1, 1], [-1e8, 1] -> lanes ((1e8 + 1) + -1e8, (1 + 1) + 1) = (0, 3) -> 3;
    # the tree alone over the zero-padded chunk gives (1e8 + -1e8 + ...) = 4
    z = torch.tensor([1e8, 1.0, 1.0, 1.0, -1e8, 1.0], dtype=torch.float32)
    assert reference.chunk_partials(z, 6, 2).item() == 3.0
    assert reference.chunk_partials(torch.nn.functional.pad(z, (0, 2)), 8).item() == 4.0
    # a partial last chunk's missing rows add nothing
    assert reference.chunk_partials(torch.tensor([1.0, 2.0, 4.0]), 6, 2).item() == 7.0
    # a param's sum: chunk partials by the tree in groups of STATS_GROUP, then the groups in order
    old, new = torch.zeros(5), torch.tensor([3.0, 0.0, 0.0, 0.0, 4.0])
    assert reference.update_statistics(old, new) == (25.0, 25.0)


@pytest.mark.skipif(not _ops.HAS_EXT, reason=f"the C++ extension is not built: {_ops.EXT_ERROR}")
@pytest.mark.parametrize("fmt,shape", [("fp32", (2048 * 2048 + 2048 * 3 + 5,)), ("int8", (2, 2048 * 256 + 300))])
def test_cpu_statistics_past_one_group_of_chunks(fmt, shape):
    # more than STATS_GROUP chunks (int8: blocks) in one param: the group tree, then the groups in order
    params, ref = _params(torch.float32, [shape]), _params(torch.float32, [shape])
    for p in params + ref:
        # a first chunk 1e9 times larger: the other chunks' sums then round away against it in
        # float64 unless they are added exactly as defined (similar-sized float32 partials add
        # exactly in float64 in any order, and could not tell the group tree from another order)
        with torch.no_grad():
            p.view(-1)[:256].mul_(1e9)
    oc, orf = _opt(params, "cpu", fmt, "nearest"), _opt(ref, "reference", fmt, "nearest")
    _grads(params, 0)
    _grads(ref, 0)
    oc.step()
    orf.step()
    assert torch.equal(_sums(oc), _sums(orf))


@pytest.mark.skipif(not _ops.HAS_EXT, reason=f"the C++ extension is not built: {_ops.EXT_ERROR}")
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_cpu_statistics_do_not_depend_on_threads_or_isa(fmt):
    def run(threads, isa):
        before_t, before_isa = torch.get_num_threads(), torch.ops.onepass._cpu_isa()
        torch.set_num_threads(threads)
        torch.ops.onepass._cpu_isa_set(isa)
        try:
            # > 32K elements per thread so the parallel split falls inside the big tensor
            params = _params(torch.float32, [(300, 301), (2048 * 9 + 3,)])
            opt = _opt(params, "cpu", fmt, "nearest")
            _grads(params, 0)
            opt.step()
            return _sums(opt)
        finally:
            torch.set_num_threads(before_t)
            torch.ops.onepass._cpu_isa_set(before_isa)

    isas = list(torch.ops.onepass._cpu_isa_supported())
    want = run(1, isas[0])
    for threads in (1, 2, 3):
        for isa in isas:
            assert torch.equal(run(threads, isa), want), (threads, isa)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("cpu",) if b in onepass.available_backends("cpu")])
def test_statistics_api(backend):
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    groups = onepass.param_groups(model, 0.1)
    opt = onepass.AdamW(groups, lr=1e-2, backend=backend, statistics=True)
    assert opt.statistics() == {}
    model(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    st = opt.statistics()
    assert set(st) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        w_norm, d_norm, ratio = st[name].tolist()
        assert w_norm == pytest.approx(p.detach().double().norm().item(), rel=1e-6)
        assert 0.0 < d_norm and ratio == pytest.approx(d_norm / w_norm)
    # first Adam step: every element moves by about lr (m̂/√v̂ = ±1), so ‖Δw‖ ≈ lr·√n
    n0 = model[0].weight.numel()
    assert st["0.weight"][1].item() == pytest.approx(1e-2 * math.sqrt(n0), rel=0.05)
    # a skipped (overflow) step reports NaN and changes nothing
    before = [p.detach().clone() for p in model.parameters()]
    opt.grad_scale = torch.tensor(8.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.isnan(v).all() for v in opt.statistics().values())
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_statistics_only_where_asked():
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = onepass.AdamW([{"params": [a], "statistics": True}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert list(opt.statistics()) == ["0.0"]
    # statistics on or off, the same bits
    c = nn.Parameter(torch.ones(4))
    plain = onepass.AdamW([c], lr=0.1)
    c.grad = torch.ones(4)
    plain.step()
    assert torch.equal(a.detach(), c.detach())
