"""The triton backend's fused update statistics (Batch.stats, reference.update_statistics):
torch.equal with the reference's sums after every step, for every param dtype, state format and
param rounding, and for the program-to-chunk mappings (one or several chunks a program, whatever
the BLOCK of steps without statistics; int8 blocks as chunks).

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors; with one, on
CUDA tensors. Tensors are small: the interpreter is slow.
"""
from __future__ import annotations

import math

import pytest
import torch

import onepass
from onepass import reference
from onepass.backends import BACKENDS

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_why = BACKENDS["triton"].unavailable_reason(torch.device(DEVICE))
if _why is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"triton backend unavailable here: {_why}")]

CHUNK = reference.STATS_CHUNK
# 0 elements, 1, a prime, several chunks with a partial last one, a 2-D weight
SHAPES = [(0,), (1,), (13,), (2 * CHUNK + 3,), (7, 9)]
# int8 state: rows whose length is not a multiple of 256 (partial last block of every row), whole
# blocks, a 1-D tensor (one row), and an empty 2-D weight
INT8_SHAPES = [(3, 700), (2, 256), (600,), (0, 5)]


def _bits(x):
    x = x.detach().cpu()
    if x.is_floating_point():
        return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    return x


def _pair(make, steps=2, grads=None, toggle=None, **kw):
    """Runs triton (on DEVICE) and the reference (on CPU) with statistics=True side by side;
    after every step the stats tensors (opt._last_stats) and the params must be equal."""
    ref_params = [torch.nn.Parameter(t) for t in make()]
    tri_params = [torch.nn.Parameter(t.to(DEVICE)) for t in make()]
    kw = dict(kw)
    grad_scale = kw.pop("grad_scale", None)
    common = dict(lr=1e-2, weight_decay=0.1, seed=77, min_int8_numel=0, statistics=True, **kw)
    tri = onepass.AdamW(tri_params, backend="triton", **common)
    ref = onepass.AdamW(ref_params, backend="reference", **common)
    if grad_scale is not None:  # as torch.amp.GradScaler hands it over
        tri.grad_scale, ref.grad_scale = grad_scale.to(DEVICE), grad_scale
    gen = torch.Generator().manual_seed(7)
    seen = []
    for s in range(steps):
        if toggle is not None:  # statistics switched per step (the plan is kept across steps)
            for opt in (tri, ref):
                opt.param_groups[0]["statistics"] = toggle(s)
        for j, (p, q) in enumerate(zip(tri_params, ref_params)):
            g = grads(s, j, q) if grads is not None else \
                torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.dtype)
            q.grad = g
            p.grad = g.to(DEVICE)
        tri.step()
        ref.step()
        for j, (p, q) in enumerate(zip(tri_params, ref_params)):
            assert torch.equal(_bits(p), _bits(q)), f"step {s}: param {j}"
        a, b = tri._last_stats, ref._last_stats
        assert len(a) == len(b), f"step {s}: stats batches"
        for (pa, sa), (pb, sb) in zip(a, b):
            assert len(pa) == len(pb) and sa.shape == sb.shape == (len(pa), 2)
            assert sa.dtype == torch.float64 and sa.device.type == torch.device(DEVICE).type
            assert torch.equal(_bits(sa), _bits(sb)), f"step {s}: stats\n{sa}\n{sb}"  # NaN too
        seen.append([sb.clone() for _, sb in b])
    return seen, tri_params


def _make(shapes, dtype, seed=3, spread=False):
    def make():
        gen = torch.Generator().manual_seed(seed)
        out = []
        for shape in shapes:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            if spread and x.numel():  # magnitudes over many decades: every summation order differs
                top = spread if isinstance(spread, (int, float)) and spread is not True else \
                    (3 if dtype == torch.float16 else 6)
                x = x * torch.logspace(-top, top, x.numel(), dtype=torch.float64).view(shape)
            out.append(x.to(dtype))
        return out
    return make


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_fp32_state_all_dtypes(dtype):
    seen, params = _pair(_make(SHAPES, dtype, spread=True))
    sums = seen[-1][0]
    assert torch.equal(sums[0], torch.zeros(2, dtype=torch.float64))  # the empty param
    assert (sums[1:] > 0).all()
    # sanity: close to the plain sums of squares (the last param's w**2)
    w = params[-1].detach().cpu().to(reference.math_dtype(dtype)).double()
    assert math.isclose(float(sums[-1, 0]), float((w * w).sum()), rel_tol=1e-5)


LOWP = [("bf16", torch.float32, "nearest"), ("bf16", torch.bfloat16, "nearest"),
        ("bf16", torch.bfloat16, "stochastic"), ("bf16", torch.bfloat16, "kahan"),
        ("bf16", torch.float16, "nearest"), ("fp32", torch.bfloat16, "stochastic"),
        ("fp32", torch.bfloat16, "kahan")]


@pytest.mark.parametrize("fmt,dtype,rounding", LOWP, ids=[f"{f}-{str(d)[6:]}-{r}" for f, d, r in LOWP])
def test_bf16_state_and_param_roundings(fmt, dtype, rounding):
    _pair(_make([(1,), (13,), (CHUNK + 5,)], dtype, spread=True), state_dtype=fmt,
          param_rounding=rounding)


INT8 = [(torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"),
        (torch.bfloat16, "kahan"), (torch.float16, "nearest")]


@pytest.mark.parametrize("dtype,rounding", INT8, ids=[f"{str(d)[6:]}-{r}" for d, r in INT8])
def test_int8_state_blocks_are_chunks(dtype, rounding):
    seen, _ = _pair(_make(INT8_SHAPES, dtype, spread=True), state_dtype="int8", param_rounding=rounding)
    assert torch.equal(seen[-1][0][-1], torch.zeros(2, dtype=torch.float64))


GROUP = reference.STATS_GROUP


def _param_sum(parts):
    """reference.update_statistics' sum of one param's float64 chunk partials."""
    return reference.sequential_sum(reference.chunk_partials(parts, GROUP)) if parts.numel() else 0.0


def test_order_of_the_sums():
    # One huge chunk first, then many small ones: the chunk partials (fewer than STATS_GROUP, so
    # one group) are added by the halving tree in float64, not one after another (which gives
    # other bits), and inside a chunk the halving tree over values of many decades.
    def make():
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(21 * CHUNK - 100, generator=gen)
        x[:CHUNK] *= 1e9
        x[CHUNK:] *= torch.logspace(-3, 3, x.numel() - CHUNK)
        return [x]

    seen, params = _pair(make, steps=1)
    w = params[0].detach().cpu()
    parts = reference.chunk_partials(torch.mul(w, w), CHUNK).double()
    got = seen[0][0][0, 0].item()
    assert got == _param_sum(parts)
    # the test has teeth: the same partials added in order (the old definition) give other bits
    assert got != reference.sequential_sum(parts)


def _synthetic_partials(counts, seed):
    """Positive float64 chunk partials (as squares' sums are) over many decades, per param."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        x = torch.randn(n, generator=gen, dtype=torch.float64).abs()
        if n:
            x *= torch.logspace(-12, 12, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
        out.append(x)
    return out


def test_group_tree_then_groups_in_order():
    # The two summing kernels on synthetic chunk partials, against the reference's definition:
    # params of 0 chunks, 1, a group less one, a whole group, a group and one, several groups
    # with a partial last one, and one more after them (its groups start mid-buffer).
    from onepass.backends import triton as tb

    counts = [0, 1, GROUP - 1, GROUP, GROUP + 1, 0, 3 * GROUP + 5, 7, 2 * GROUP + 3]
    w, d = _synthetic_partials(counts, 11), _synthetic_partials(counts, 12)
    w[4][GROUP] = 1e30  # w: the lone chunk of the second group dominates
    w[8][GROUP + 1] = float("inf")  # an inf in one group: the param's sum is inf
    w[6][5], w[6][-1] = float("inf"), float("nan")  # inf in the first group, NaN in the last: NaN
    flat = torch.stack([torch.cat(w), torch.cat(d)], dim=1).reshape(-1)  # part[2c], part[2c + 1]
    cs = [0]
    for n in counts:
        cs.append(cs[-1] + n)
    gtab, gctab, n_groups = tb.stats_group_tables(cs, torch.device(DEVICE))
    assert n_groups == sum(-(-n // GROUP) for n in counts)
    gsums = torch.full((2 * n_groups,), -1.0, dtype=torch.float64, device=DEVICE)
    out = torch.full((len(counts), 2), -1.0, dtype=torch.float64, device=DEVICE)
    tb.sum_stats(flat.to(DEVICE), gtab, gctab, n_groups, gsums, out)
    want = torch.tensor([[_param_sum(w[i]), _param_sum(d[i])] for i in range(len(counts))],
                        dtype=torch.float64)
    assert torch.equal(_bits(out), _bits(want)), f"{out}\n{want}"
    assert torch.isnan(out[6, 0]) and torch.isinf(out[8, 0]) and out[0].eq(0).all()
    # teeth: the plain in-order sum gives other bits, and (param 6, four groups) so does one tree
    # over the whole param, zero-padded to a power of two
    for i in (2, 4, 6, 8):
        assert out[i, 1].item() != reference.sequential_sum(d[i]), i
    assert out[6, 1].item() != reference.chunk_partials(d[6], 4 * GROUP).item()


def test_int8_param_of_more_than_a_group_of_blocks(monkeypatch):
    # The whole path: a param of GROUP + 1 int8 blocks (chunks), so two groups, the second with a
    # single block, and a small param after it. The first block is huge: added one after another,
    # the others' partials would each round away on it (float32 partials of similar magnitude
    # add exactly in float64 in any order), so only the group tree gives the reference's bits.
    # (More blocks a program: the interpreter is slow.)
    from onepass.backends import triton as tb

    monkeypatch.setattr(tb, "INT8_BLOCKS", 256)
    length = (GROUP + 1) * reference.INT8_BLOCK

    def make():
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(1, length, generator=gen)
        x[0, :reference.INT8_BLOCK] *= 1e9
        return [x, torch.randn(3, 300, generator=gen)]

    seen, params = _pair(make, steps=1, state_dtype="int8")
    w = params[0].detach().cpu().reshape(-1)
    parts = reference.chunk_partials(torch.mul(w, w), reference.INT8_BLOCK).double()
    assert seen[0][0][0, 0].item() != reference.sequential_sum(parts)  # the test has teeth


@pytest.mark.parametrize("block,chunks", [(1024, 1), (4096, 2)])
def test_program_blocks_other_than_the_chunk(monkeypatch, block, chunks):
    # Steps without statistics use the tuned BLOCK (smaller or larger than a chunk), steps with
    # them programs of `chunks` whole chunks (one, or several with the last tensor's end in the
    # second program's second chunk); statistics may be on for some steps only.
    from onepass.backends import triton as tb

    monkeypatch.setattr(tb, "config_for", lambda device: (block, 4))
    monkeypatch.setattr(tb, "STATS_CHUNKS", chunks)
    monkeypatch.setattr(tb, "STATS_CHUNKS_INTERPRETED", chunks)
    _pair(_make([(3 * CHUNK + 1,), (5,), (2 * CHUNK,)], torch.float32, spread=True), steps=3,
          toggle=lambda s: s != 1)


def test_non_contiguous_params():
    def make():
        gen = torch.Generator().manual_seed(5)
        transposed = torch.randn(3000, 2, generator=gen).t()       # dense, walked in storage order
        strided = torch.randn(4, 1200, generator=gen)[:, ::2]       # gaps: walked row-major
        return [transposed, strided, torch.randn(40, generator=gen)]

    def grads(s, j, q):
        g = torch.randn(q.shape[::-1], generator=torch.Generator().manual_seed(10 * s + j))
        return g.t()

    _pair(make, grads=grads)


def test_mixed_dtypes_in_one_group():
    # One batch, one launch per param dtype, one partials buffer and one summing launch.
    def make():
        gen = torch.Generator().manual_seed(8)
        return [torch.randn(CHUNK + 2, generator=gen).bfloat16(), torch.randn(5, 7, generator=gen),
                torch.zeros(0), torch.randn(300, generator=gen).half(), torch.randn(9, generator=gen)]

    _pair(make)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: inf - inf
def test_non_finite_values():
    # float16 params past 65504 are inf: w*w = inf, d = inf - inf = NaN; bits compared.
    seen, _ = _pair(_make([(CHUNK + 1,), (3, 300)], torch.float16, spread=6), steps=1)
    assert torch.isinf(seen[0][0][:, 0]).all() and torch.isnan(seen[0][0][:, 1]).all()
    _pair(_make([(3, 300)], torch.float16, spread=6), steps=1, state_dtype="int8")


def test_amsgrad_coupled_grad_scale():
    _pair(_make([(CHUNK + 9,), (6, 5)], torch.float32), amsgrad=True, decoupled=False,
          maximize=True, grad_scale=torch.tensor(64.0))


def test_skipped_step_leaves_stats_alone():
    p = torch.nn.Parameter(torch.randn(50).to(DEVICE))
    opt = onepass.AdamW([p], backend="triton", statistics=True)
    p.grad = torch.randn(50).to(DEVICE)
    opt.found_inf = torch.ones((), device=DEVICE)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before)
    (_, sums), = opt._last_stats
    assert torch.isnan(sums).all()
    opt.found_inf = torch.zeros((), device=DEVICE)
    opt.step()
    (_, sums), = opt._last_stats
    assert not torch.isnan(sums).any()
