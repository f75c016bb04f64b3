"""Low-precision state and params: the reference's storage rules, checked against independent
statements, and the optimizer's handling of state formats (reference backend: the kernels are
checked against it in tests/backends)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import onepass
from onepass import quant, reference
from onepass.optimizer import torch_state_dict


# ---- the hash ---------------------------------------------------------------------------------

def _mix32_numpy(x: np.ndarray) -> np.ndarray:
    """The mixing function in numpy uint32 arithmetic (wraps natively): an independent statement."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x21F0AAAD)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x735A2D97)
        x ^= x >> np.uint32(15)
    return x


def test_mix32_equals_uint32_arithmetic():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=100_000, dtype=np.uint64)
    ours = reference.mix32(torch.from_numpy(x.astype(np.int64)))
    assert np.array_equal(ours.numpy().astype(np.uint32), _mix32_numpy(x))
    assert reference.mix32(int(x[0])) == int(_mix32_numpy(x[:1])[0])


def test_random_bits_fold_the_high_index_bits():
    idx = torch.tensor([5, 5 + 2**32, 5 + 2**33], dtype=torch.int64)
    bits = reference.random_bits(reference.stream_key(1, 3, 0), idx)
    assert len(set(bits.tolist())) == 3
    assert bits.min() >= 0 and bits.max() < 2**32


def test_streams_differ_by_seed_step_and_stream():
    streams = (reference.STREAM_PARAM, reference.STREAM_MOMENTS)
    keys = {reference.stream_key(s, t, k) for s in (0, 1) for t in (1, 2) for k in streams}
    assert len(keys) == 8


def test_moment_bits_round_m_and_v_independently():
    # One draw serves both moments (m: low 16 bits, v: high 16). Values halfway between two bf16
    # neighbours round up with probability 1/2 each; if the halves were one (or correlated), both
    # would round up together half the time instead of a quarter. 2**20 draws: sd 0.0005 of each
    # rate, 0.0004 of the joint one.
    n = 2**20
    bits = reference.random_bits(reference.stream_key(3, 5, reference.STREAM_MOMENTS),
                                 torch.arange(n, dtype=torch.int64))
    bits_m, bits_v = reference.moment_bits(bits)
    # the rule itself (the kernels are held to the reference's bits, so this pins theirs too)
    assert torch.equal(bits_m & 0xFFFF, bits & 0xFFFF)
    assert torch.equal(bits_v & 0xFFFF, bits >> 16)
    x = torch.full((n,), 1.0 + 2**-8)  # bf16 keeps 7 bits: 2**-8 is half an ulp
    up_m = reference.round_bf16_stochastic(x, bits_m).float() > 1.0
    up_v = reference.round_bf16_stochastic(x, bits_v).float() > 1.0
    assert abs(up_m.double().mean().item() - 0.5) < 0.003
    assert abs(up_v.double().mean().item() - 0.5) < 0.003
    assert abs((up_m & up_v).double().mean().item() - 0.25) < 0.003


# ---- stochastic rounding ------------------------------------------------------------------------

def test_stochastic_rounding_is_exactly_unbiased_over_all_random_bits():
    # Over all 2**16 values of the random bits, x rounds up exactly (dropped bits) times, so the
    # mean of the rounded values is x itself.
    x = torch.tensor([1.0 + 2**-10 + 2**-20, -3.14159, 1e-30, 65504.123], dtype=torch.float32)
    bits = torch.arange(2**16, dtype=torch.int64)
    for v in x:
        r = reference.round_bf16_stochastic(v.expand(2**16).contiguous(), bits).double()
        assert r.mean().item() == pytest.approx(v.double().item(), rel=1e-12, abs=0)
        lo, hi = r.min().item(), r.max().item()
        assert len(torch.unique(r)) <= 2 and lo <= v.item() <= hi


def test_stochastic_rounding_keeps_exact_and_special_values():
    x = torch.tensor([0.0, -0.0, 1.5, -2.0, float("inf"), -float("inf"), float("nan")])
    bits = torch.full((7,), 0xFFFF, dtype=torch.int64)
    r = reference.round_bf16_stochastic(x, bits)
    assert torch.equal(r.float()[:6], x[:6]) and torch.isnan(r[6])
    assert torch.signbit(r[1])


# ---- int8 blocks --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(quant.MAPS))
def test_quantize_picks_the_nearest_code_ties_to_the_lower(name):
    torch.manual_seed(0)
    x = torch.randn(7, 600) * torch.logspace(-6, 0, 600)  # partial last block, wide range
    for signed, data in ((True, x), (False, x * x)):
        code, mid = quant.code_table(name, signed), quant.midpoints(name, signed)
        q, absmax = reference.quantize_blocks(data, mid)
        assert absmax.shape == reference.absmax_shape(data.shape) == (7, 3)
        blocks = torch.nn.functional.pad(data, (0, 168)).view(7, 3, 256).abs().amax(-1)
        assert torch.equal(absmax, blocks)
        scale = absmax.repeat_interleave(256, 1)[:, :600]
        xn = (data / scale).double()
        dist = (xn.unsqueeze(-1) - code.double()).abs()  # brute force over all 256 codes
        best = dist.min(-1).values
        # our code is at the minimal distance, up to the float32 rounding of the midpoints
        mine = dist.gather(-1, q.long().unsqueeze(-1)).squeeze(-1)
        assert (mine - best).max().item() <= 1e-7
        # the block's largest element is stored exactly
        deq = reference.dequantize_blocks(q, absmax, code)
        assert torch.equal(deq.abs().view(7, -1).amax(-1), data.abs().amax(-1))


def test_a_nan_block_stays_nan_and_leaves_the_others_alone():
    x = torch.ones(2, 512)
    x[1, 300] = float("nan")
    q, absmax = reference.quantize_blocks(x, quant.midpoints(quant.SIGNED_MAP, True))
    assert torch.isnan(absmax[1, 1]) and torch.isfinite(absmax).sum() == 3
    deq = reference.dequantize_blocks(q, absmax, quant.code_table(quant.SIGNED_MAP, True))
    assert torch.isnan(deq[1, 256:]).all() and torch.equal(deq[0], x[0]) and torch.equal(deq[1, :256], x[1, :256])


def test_maps_are_sorted_and_hold_zero_and_one():
    for name in quant.MAPS:
        for signed in (True, False):
            c = quant.code_table(name, signed)
            assert c.numel() == 256 and bool((c[1:] > c[:-1]).all())
            assert c[-1] == 1 and (c[0] == -1 if signed else c[0] == 0) and (c == 0).any()
    assert quant.tables().numel() == quant.TABLES_LEN


# ---- the optimizer --------------------------------------------------------------------------------

def _params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(96, 300, dtype=dtype)),
            torch.nn.Parameter(torch.randn(40, dtype=dtype)),
            torch.nn.Parameter(torch.randn(8, 8, dtype=dtype))]


def _grads(params, t):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _run(params, opt, steps, start=0):
    for t in range(start, start + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()


def _state_bytes(opt, p):
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")


def test_state_bytes_per_param():
    p = torch.nn.Parameter(torch.randn(768, 768))
    per = {}
    for fmt in ("fp32", "bf16", "int8"):
        opt = onepass.AdamW([p], state_dtype=fmt, backend="reference")
        _run([p], opt, 1)
        per[fmt] = _state_bytes(opt, p) / p.numel()
    assert per == {"fp32": 8.0, "bf16": 4.0, "int8": pytest.approx(2 + 8 / 256)}
    assert per["int8"] <= 2.04


def test_small_and_1d_tensors_keep_fp32_state_under_int8():
    params = _params()
    opt = onepass.AdamW(params, state_dtype="int8", backend="reference")
    _run(params, opt, 1)
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.uint8, torch.float32, torch.float32]
    opt2 = onepass.AdamW(params[2:], state_dtype="int8", min_int8_numel=0, backend="reference")
    _run(params[2:], opt2, 1)
    assert opt2.state[params[2]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_low_precision_state_tracks_fp32_state(fmt):
    ref = _params()
    lowp = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    o1 = onepass.AdamW(ref, lr=1e-3, backend="reference")
    o2 = onepass.AdamW(lowp, lr=1e-3, state_dtype=fmt, backend="reference")
    _run(ref, o1, 20)
    _run(lowp, o2, 20)
    moved = (ref[0] - _params()[0]).abs().mean()
    err = (ref[0] - lowp[0]).abs().mean()
    assert err < 0.05 * moved, (err, moved)  # same direction of travel, a few % apart


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_save_load_resumes_with_the_same_bits(fmt):
    a = _params(torch.bfloat16)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, state_dtype=fmt, param_rounding="stochastic", seed=7, backend="reference")
    oa = onepass.AdamW(a, **kw)
    _run(a, oa, 6)
    ob = onepass.AdamW(b, **kw)
    _run(b, ob, 3)
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    ob2 = onepass.AdamW(b, **kw)
    ob2.load_state_dict(torch.load(buf))
    _run(b, ob2, 3, start=3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob2.state[q][k]), k


def test_torch_fp32_state_loads_into_int8_and_exports_back():
    params = _params()
    theirs = torch.optim.AdamW(params, lr=1e-3)
    _run(params, theirs, 3)
    ours = onepass.AdamW(params, lr=1e-3, state_dtype="int8", backend="reference")
    ours.load_state_dict(theirs.state_dict())
    st = ours.state[params[0]]
    assert st["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in st  # quantized on load
    exported = torch_state_dict(ours)
    back = torch.optim.AdamW(params, lr=1e-3)
    back.load_state_dict(exported)
    m_torch = theirs.state[params[0]]["exp_avg"]
    m_back = back.state[params[0]]["exp_avg"]
    assert m_back.dtype == torch.float32
    # float3 codes are 2**-4 of a binade apart: the error is at most half that, 2**-5 of the
    # block's absmax (the top binade), which the tensor's absmax bounds
    assert (m_back - m_torch).abs().max() <= 2 ** -5 * m_torch.abs().max()
    _run(params, back, 1)  # torch continues from it


def test_bf16_params_stochastic_and_kahan_beat_nearest():
    # Steps of ~lr = 1e-3 on bf16 params near 1 (ulp 2**-7): nearest rounding loses every one of
    # them; stochastic rounding keeps them on average (error ~ sqrt(drift * ulp) = 0.03 after
    # 100 steps against 0.1 for nearest), Kahan keeps them exactly up to bf16 compensation.
    torch.manual_seed(1)
    target = torch.randn(16, 300) + 3
    results = {}
    for rnd in ("nearest", "stochastic", "kahan"):
        p32 = torch.nn.Parameter(torch.ones(16, 300))
        p16 = torch.nn.Parameter(torch.ones(16, 300, dtype=torch.bfloat16))
        o32 = onepass.AdamW([p32], lr=1e-3, weight_decay=0.0, backend="reference")
        o16 = onepass.AdamW([p16], lr=1e-3, weight_decay=0.0, param_rounding=rnd, backend="reference")
        for _ in range(100):
            p32.grad = p32.detach() - target
            p16.grad = (p16.detach().float() - target).bfloat16()
            o32.step()
            o16.step()
        value = p16.detach().float()
        if rnd == "kahan":
            value = value + o16.state[p16]["kahan_comp"].float()
        results[rnd] = (value - p32.detach()).abs().mean().item()
    assert results["stochastic"] < 0.5 * results["nearest"]
    assert results["kahan"] < 0.5 * results["nearest"]


def test_stochastic_rounding_is_reproducible_and_seeded():
    outs = []
    for seed in (3, 3, 4):
        ps = _params(torch.bfloat16)
        opt = onepass.AdamW(ps, lr=1e-3, param_rounding="stochastic", seed=seed, backend="reference")
        _run(ps, opt, 2)
        outs.append(ps[0].detach().clone())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_found_inf_skips_an_int8_step_entirely():
    params = _params()
    opt = onepass.AdamW(params, state_dtype="int8", backend="reference")
    _run(params, opt, 1)
    before = [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.found_inf = torch.ones(())
    _run(params, opt, 1)
    del opt.found_inf
    assert all(torch.equal(a, p) for a, p in zip(before[0], params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in before[1].items())


def test_a_nan_gradient_is_not_hidden_in_int8_state():
    # Policy (README): non-finite gradients propagate as in torch.optim.AdamW: the block holding
    # one becomes NaN (its absmax is NaN), never silently zeroed like bitsandbytes does.
    params = _params()[:1]
    opt = onepass.AdamW(params, state_dtype="int8", backend="reference")
    _run(params, opt, 1)
    params[0].grad = torch.zeros_like(params[0])
    params[0].grad[5, 260] = float("nan")
    opt.step()
    a = opt.state[params[0]]["exp_avg_absmax"]
    assert torch.isnan(a[5, 1]) and torch.isfinite(a).sum() == a.numel() - 1
    assert torch.isnan(params[0][5, 260]) and torch.isfinite(params[0][4]).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(state_dtype="int4"), "state_dtype"),
    (dict(state_dtype="int8", amsgrad=True), "amsgrad"),
    (dict(param_rounding="up"), "param_rounding"),
    (dict(seed=-1), "seed"),
    (dict(min_int8_numel=-5), "min_int8_numel"),
])
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        onepass.AdamW(_params(), **kwargs)


def test_stochastic_rounding_of_fp16_params_is_rejected():
    with pytest.raises(ValueError, match="bfloat16"):
        onepass.AdamW(_params(torch.float16), param_rounding="stochastic")


def test_switching_state_dtype_converts_the_state():
    params = _params()
    opt = onepass.AdamW(params, state_dtype="fp32", backend="reference")
    _run(params, opt, 2)
    m = opt.state[params[0]]["exp_avg"].clone()
    opt.param_groups[0]["state_dtype"] = "bf16"
    _run(params, opt, 1, start=2)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert (opt.state[params[0]]["exp_avg"].float() - m).abs().max() < m.abs().max()


def test_auto_moves_on_to_a_backend_that_runs_the_format(monkeypatch):
    from onepass.backends import BACKENDS

    monkeypatch.setattr(type(BACKENDS["cpu"]), "state_formats", ("fp32",))
    params = _params()[:1]
    opt = onepass.AdamW(params, state_dtype="int8")
    _run(params, opt, 1)
    assert opt.last_backends == ["reference"]
    named = onepass.AdamW(params, state_dtype="int8", backend="cpu")
    if "cpu" in onepass.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="cannot run this group"):
            _run(params, named, 1)
