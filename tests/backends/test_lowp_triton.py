"""The triton backend's low-precision paths (bf16 / int8 state, stochastic / Kahan bf16 params)
against the reference: torch.equal on params and every state tensor after every step.

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors; with one, on
CUDA tensors. Tensors are small: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.backends import BACKENDS

from .._bits import first_difference

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_why = BACKENDS["triton"].unavailable_reason(torch.device(DEVICE))
if _why is not None:
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"triton backend unavailable here: {_why}")]

SHAPES = [(8, 300), (4, 64), (2, 520), (600,)]  # partial blocks, one block, 3 blocks a row, 1-D
OPTIONS = {
    "plain": {},
    "maximize": {"maximize": True},
    "coupled": {"decoupled": False},
    "tensor_lr": {"lr": torch.tensor(3e-3)},
}
CASES = [
    (fmt, dtype, rounding)
    for fmt in ("bf16", "int8")
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for rounding in (("nearest", "stochastic", "kahan") if dtype == torch.bfloat16 else ("nearest",))
]


def _state(opt, p):
    st = opt.state.get(p, {})
    return [(k, st[k]) for k in sorted(st)]


def _check_same(tag, a_params, a_opt, b_params, b_opt):
    # bit for bit, NaNs as values (a GPU canonicalizes their payloads: tests/_bits.py)
    for j, (p, q) in enumerate(zip(a_params, b_params)):
        why = first_difference(p.detach().cpu(), q.detach().cpu())
        assert why is None, f"{tag}: param {j}: {why}"
        sa, sb = _state(a_opt, p), _state(b_opt, q)
        assert [k for k, _ in sa] == [k for k, _ in sb], f"{tag}: state keys of param {j}"
        for (k, x), (_, y) in zip(sa, sb):
            why = first_difference(x.detach().cpu(), y.detach().cpu())
            assert why is None, f"{tag}: {k} of param {j}: {why}"


def _pair(make, steps=3, grads=None, **kw):
    """Runs triton (on DEVICE) and the reference (on CPU) side by side, comparing after every step."""
    ref_params = [torch.nn.Parameter(t) for t in make()]
    tri_params = [torch.nn.Parameter(t.to(DEVICE)) for t in make()]
    kw = dict(kw)
    lr = kw.pop("lr", 1e-2)
    grad_scale = kw.pop("grad_scale", None)
    lr_tri = lr.to(DEVICE) if isinstance(lr, torch.Tensor) else lr
    common = dict(weight_decay=0.1, seed=1234, min_int8_numel=0, **kw)
    tri = onepass.AdamW(tri_params, lr=lr_tri, backend="triton", **common)
    ref = onepass.AdamW(ref_params, lr=lr, backend="reference", **common)
    if grad_scale is not None:  # as torch.amp.GradScaler hands it over
        tri.grad_scale, ref.grad_scale = grad_scale.to(DEVICE), grad_scale
    gen = torch.Generator().manual_seed(7)
    for s in range(steps):
        for j, (p, q) in enumerate(zip(tri_params, ref_params)):
            g = grads(s, j, q) if grads is not None else \
                torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.dtype)
            q.grad = g
            p.grad = None if g is None else g.to(DEVICE)
        tri.step()
        ref.step()
        _check_same(f"step {s}", tri_params, tri, ref_params, ref)
    return tri, tri_params


def _tensors(dtype):
    def make():
        gen = torch.Generator().manual_seed(3)
        return [torch.randn(shape, generator=gen).to(dtype) for shape in SHAPES]
    return make


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("fmt,dtype,rounding", CASES,
                         ids=[f"{f}-{str(d)[6:]}-{r}" for f, d, r in CASES])
def test_matches_reference(fmt, dtype, rounding, option):
    opt, params = _pair(_tensors(dtype), state_dtype=fmt, param_rounding=rounding, **OPTIONS[option])
    st = opt.state[params[0]]
    assert st["exp_avg"].dtype == (torch.uint8 if fmt == "int8" else torch.bfloat16)
    assert ("kahan_comp" in st) == (rounding == "kahan")


@pytest.mark.parametrize("fmt,rounding", [("bf16", "stochastic"), ("int8", "kahan"), ("int8", "nearest")])
def test_grad_scale_mixed_dtypes_and_step_counts(fmt, rounding):
    # One group of float32 and bfloat16 params (and float16 ones where the rounding allows them):
    # one launch per dtype. The first param skips step 0, so the batch holds two step counts and
    # two sets of random-stream keys.
    def make():
        gen = torch.Generator().manual_seed(9)
        ps = [torch.randn(3, 280, generator=gen).bfloat16(), torch.randn(5, 40, generator=gen),
              torch.randn(4, 70, generator=gen).bfloat16()]
        return ps + ([torch.randn(2, 300, generator=gen).half()] if rounding == "nearest" else [])

    def grads(s, j, q):
        if s == 0 and j == 0:
            return None
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(10 * s + j))
        return (g * 1024).to(q.dtype)

    _pair(make, grads=grads, steps=4, state_dtype=fmt, param_rounding=rounding,
          grad_scale=torch.tensor(1024.0))


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_non_contiguous_params_and_grads(fmt):
    def make():
        gen = torch.Generator().manual_seed(5)
        transposed = torch.randn(300, 6, generator=gen).bfloat16().t()      # dense, not contiguous
        strided = torch.randn(6, 600, generator=gen).bfloat16()[:, ::2]     # a view with gaps
        return [transposed, strided, torch.randn(4, 40, generator=gen).bfloat16()]

    def grads(s, j, q):
        g = torch.randn(q.shape[::-1], generator=torch.Generator().manual_seed(10 * s + j))
        return g.bfloat16().t()  # a non-contiguous grad for every param

    # (int8 with Kahan needs a contiguous compensation, which a transposed param does not get:
    # check_batch refuses it on every backend.)
    for rounding in ("nearest", "stochastic") + (("kahan",) if fmt == "bf16" else ()):
        _pair(make, grads=grads, state_dtype=fmt, param_rounding=rounding)


def test_int8_nan_gradient():
    def grads(s, j, q):
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64).to(q.dtype)
        if s == 1:
            g[1, 5] = float("nan")
        return g

    def make():
        return [torch.randn(4, 300, generator=torch.Generator().manual_seed(2))]

    opt, params = _pair(make, grads=grads, state_dtype="int8")
    st = opt.state[params[0]]
    for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        a = st[k].cpu()
        assert torch.isnan(a[1, 0]) and not torch.isnan(a[1, 1]) and not torch.isnan(a[0]).any()


def test_backend_lists_the_formats():
    tb = BACKENDS["triton"]
    assert tb.state_formats == ("fp32", "bf16", "int8")
    assert tb.param_roundings == ("nearest", "stochastic", "kahan")


def _probe_kernel():
    """A kernel running the backend's hash and stochastic rounding on given indices and values
    (built on first use: a jit function must see its helpers as globals of this module)."""
    global adam, tl
    import triton
    import triton.language as tl

    from onepass.triton_kernels import adam

    @triton.jit
    def probe(idx_ptr, x_ptr, bits_ptr, out_ptr, key, N: tl.constexpr):
        offs = tl.arange(0, N)
        bits = adam.random_bits(key.to(tl.uint32), tl.load(idx_ptr + offs))
        tl.store(bits_ptr + offs, bits.to(tl.int32, bitcast=True))
        tl.store(out_ptr + offs, adam.round_bf16_stochastic(tl.load(x_ptr + offs), bits))

    return probe


def test_hash_and_stochastic_rounding_match_the_reference():
    # Element indices past 2**32 (the high half is folded into the key), keys with the top bit
    # set, and special values (0, -0, subnormals, the largest finite, inf, NaN).
    from onepass import reference

    probe = _probe_kernel()
    n = 64
    gen = torch.Generator().manual_seed(11)
    idx = torch.randint(0, 2**40, (n,), generator=gen, dtype=torch.int64)
    idx[:4] = torch.tensor([0, 2**32 - 1, 2**32, 2**40 - 1])
    x = torch.randn(n, generator=gen) * 1e3
    x[:8] = torch.tensor([0.0, -0.0, 1e-40, -3.4028234663852886e38, float("inf"), -float("inf"),
                          float("nan"), 3.4028234663852886e38])
    for key in (0, 0x9E3779B9, reference.stream_key(1234, 7, reference.STREAM_MOMENTS)):
        bits = torch.empty(n, dtype=torch.int32, device=DEVICE)
        out = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
        probe[(1,)](idx.to(DEVICE), x.to(DEVICE), bits, out, key, N=n)
        want_bits = reference.random_bits(key, idx)
        assert torch.equal(bits.cpu().to(torch.int64) & 0xFFFFFFFF, want_bits)
        want = reference.round_bf16_stochastic(x, want_bits)
        got = out.cpu()
        # NaN stays NaN; its bits are not compared: torch 2.13's CPU float->bf16 conversion
        # writes NaN as 0xFFFF, the kernels (like c10::BFloat16 and csrc/adam_math.h) 0x7FC0.
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def _float_map_kernel():
    """A kernel running the backend's float3-map search and decoding (built on first use, as
    _probe_kernel)."""
    global adam, tl
    import triton
    import triton.language as tl

    from onepass.triton_kernels import adam

    @triton.jit
    def fmap(x_ptr, q_ptr, v_ptr, n, SIGNED: tl.constexpr, B: tl.constexpr):
        offs = tl.program_id(0) * B + tl.arange(0, B)
        mask = offs < n
        tl.store(q_ptr + offs, adam.float_map_code(tl.load(x_ptr + offs, mask=mask, other=0.0), SIGNED),
                 mask=mask)
        tl.store(v_ptr + offs, adam.float_map_value(offs.to(tl.int32) % 256, SIGNED), mask=mask)

    return fmap


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_float_map_bits_equal_the_tables_and_the_search(signed):
    # every midpoint and code with their float32 neighbours, specials and a wide random spread:
    # the bit-level search must give the midpoint search's code, the decoding quant's table
    import triton

    from onepass import quant

    mid, code = quant.midpoints("float3", signed), quant.code_table("float3", signed)
    gen = torch.Generator().manual_seed(1)
    spread = torch.randn(4096, generator=gen) * torch.exp2(
        torch.randint(-140, 4, (4096,), generator=gen).float())
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 2.0,
                            1e-45, -1e-45, 3.4028234663852886e38])

    def near(t):
        return torch.cat([t, torch.nextafter(t, torch.tensor(-float("inf"))),
                          torch.nextafter(t, torch.tensor(float("inf")))])

    x = torch.cat([near(mid), near(code), near(-mid), special, spread]).contiguous()
    q = torch.empty(x.numel(), dtype=torch.int32, device=DEVICE)
    v = torch.empty(x.numel(), dtype=torch.float32, device=DEVICE)
    _float_map_kernel()[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), q, v, x.numel(),
                                                          SIGNED=signed, B=1024)
    want = torch.searchsorted(mid, x)
    want = torch.where(torch.isnan(x), torch.zeros_like(want), want)
    assert torch.equal(q.cpu().long(), want)
    assert torch.equal(v[:256].cpu().view(torch.int32), code.view(torch.int32))


@pytest.mark.parametrize("maps", [("dynamic", "dynamic"), ("float3", "power4")], ids=lambda m: "/".join(m))
def test_int8_table_search_path_matches_reference(maps, monkeypatch):
    # maps other than float3 on both sides take the kernel's table-search path (FMAP=False)
    from onepass import quant

    monkeypatch.setattr(quant, "SIGNED_MAP", maps[0])
    monkeypatch.setattr(quant, "UNSIGNED_MAP", maps[1])
    assert not quant.is_float3(quant.tables(DEVICE))
    _pair(_tensors(torch.float32), state_dtype="int8")
