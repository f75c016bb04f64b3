"""The cpu backend's low-precision storage: bf16 / int8 state and stochastic / Kahan bf16 params,
bit for bit against the reference backend after every step (reference.py, "Storage")."""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass import _ops, quant

pytestmark = [
    pytest.mark.cpu_kernel,
    pytest.mark.skipif(not _ops.HAS_EXT, reason=f"the C++ extension is not built: {_ops.EXT_ERROR}"),
]

# (64, 300): a partial block per row; (3, 1000): rows of 4 blocks; (70, 70): one partial block a
# row; (5000,): 1-D, which keeps fp32 state under int8; (16 * 9 + 5,): a SIMD tail.
SHAPES = [(64, 300), (3, 1000), (70, 70), (5000,), (16 * 9 + 5,)]
TRANSPOSED_PARAM = 0   # this param is a transposed (non-contiguous, dense) view
TRANSPOSED_GRAD = 2    # this grad is handed over transposed
STEPS = 4

OPTIONS = {
    "adamw": {},
    "maximize": {"maximize": True},
    "coupled": {"decoupled": False, "weight_decay": 0.05},
    "wd0": {"weight_decay": 0.0},
    "tensor_lr": {"tensor_lr": True},
    "grad_scale": {"grad_scale": True},
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cases():
    for fmt in ("bf16", "int8", "fp32"):
        for dname, dtype in DTYPES.items():
            for rnd in ("nearest", "stochastic", "kahan"):
                if rnd != "nearest" and dtype != torch.bfloat16:
                    continue
                if fmt == "fp32" and rnd == "nearest":
                    continue  # the fp32 path: test_matrix.py
                yield pytest.param(fmt, dtype, rnd, id=f"{fmt}-{dname}-{rnd}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bits(x), _bits(y))
        for x, y in zip(a, b))


def _run(backend, dtype, fmt, rnd, opts, shapes=SHAPES, steps=STEPS, nan_at=None):
    gen = torch.Generator().manual_seed(11)
    params = []
    for i, s in enumerate(shapes):
        w = torch.randn(s[::-1] if i == TRANSPOSED_PARAM else s, generator=gen) * 0.5
        w = w.to(dtype)
        params.append(torch.nn.Parameter(w.t() if i == TRANSPOSED_PARAM else w))
    assert not params[TRANSPOSED_PARAM].is_contiguous()
    lr = torch.tensor(3e-2) if opts.get("tensor_lr") else 3e-2
    kw = {k: v for k, v in opts.items() if k not in ("tensor_lr", "grad_scale")}
    kw.setdefault("weight_decay", 0.1)
    opt = onepass.AdamW(params, lr=lr, backend=backend, state_dtype=fmt, param_rounding=rnd,
                        seed=1234, min_int8_numel=0, **kw)
    history = []
    for step in range(steps):
        for i, p in enumerate(params):
            if i == TRANSPOSED_GRAD and p.dim() == 2:
                g = torch.randn(p.shape[::-1], generator=gen).t()
            else:
                g = torch.randn(p.shape, generator=gen)
            g = g.to(dtype)
            if nan_at is not None and step == nan_at[0] and i == nan_at[1]:
                g.view(-1)[nan_at[2]] = float("nan")
            p.grad = g
        if opts.get("grad_scale"):
            # as torch.amp.GradScaler hands them over: attributes of the optimizer
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)  # step 3 is skipped
            for p in params:
                p.grad = p.grad * 1024
        opt.step()
        snap = [p.detach().clone() for p in params]
        for p in params:
            snap += [opt.state[p][k].clone() for k in sorted(opt.state[p])]
        history.append(snap)
    return history, opt, params


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("fmt,dtype,rnd", list(_cases()))
def test_lowp_matches_reference_every_step(fmt, dtype, rnd, option):
    opts = OPTIONS[option]
    got, opt, params = _run("cpu", dtype, fmt, rnd, opts)
    want, _, _ = _run("reference", dtype, fmt, rnd, opts)
    for step, (a, b) in enumerate(zip(got, want)):
        assert _equal(a, b), f"step {step + 1}: {[_equal([x], [y]) for x, y in zip(a, b)]}"
    # the formats were really used
    st = opt.state[params[0]]
    if fmt == "int8":
        assert st["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in st
        assert opt.state[params[3]]["exp_avg"].dtype == torch.float32  # 1-D: fp32 state
    elif fmt == "bf16":
        assert st["exp_avg"].dtype == torch.bfloat16
    if rnd == "kahan":
        assert "kahan_comp" in st


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int8_nan_gradient_agrees_and_poisons_its_block(dtype):
    nan_at = (1, 1, 300)  # step 2, param (3, 1000), row 0, block 1
    got, opt, params = _run("cpu", dtype, "int8", "nearest", {}, nan_at=nan_at)
    want, _, _ = _run("reference", dtype, "int8", "nearest", {}, nan_at=nan_at)
    for a, b in zip(got, want):
        if dtype == torch.float32:
            assert _equal(a, b)
        else:  # a NaN's bf16 bit pattern is not specified: compare as values, NaN equal to NaN
            assert all(torch.equal(x.isnan(), y.isnan()) and torch.equal(
                torch.nan_to_num(x.float(), 0.0), torch.nan_to_num(y.float(), 0.0))
                if x.is_floating_point() else torch.equal(x, y) for x, y in zip(a, b))
    am = opt.state[params[1]]["exp_avg_absmax"]
    assert torch.isnan(am[0, 1]) and not torch.isnan(am[0, 0]) and not torch.isnan(am[1]).any()


@pytest.mark.parametrize("dtype,rnd", [(torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic"),
                                       (torch.float32, "nearest")],
                         ids=["bfloat16-nearest", "bfloat16-stochastic", "float32-nearest"])
def test_bf16_state_non_finite_values_agree_bit_for_bit(dtype, rnd):
    """inf, -inf and NaN moments (and the NaN params they make) through the bf16 stores: the
    stochastic rounding keeps an infinity and a NaN, as the reference does. NaNs compare as
    values (torch writes a bf16 NaN as 0xffff here, the kernels as 0x7fc0); every other element
    by its bits."""
    inf, nan = float("inf"), float("nan")

    def run(backend):
        gen = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter((torch.randn(4, 300, generator=gen) * 0.5).to(dtype))
        opt = onepass.AdamW([p], lr=1e-2, backend=backend, state_dtype="bf16",
                            param_rounding=rnd, seed=7)
        out = []
        for step in range(3):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            g[0, :4] = torch.tensor([inf, -inf, nan, 3e38])
            g[2, 7 * step] = -inf
            p.grad = g
            opt.step()
            st = opt.state[p]
            out.append([p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()])
        return out

    got, want = run("cpu"), run("reference")
    for step, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            nan_x, nan_y = torch.isnan(x), torch.isnan(y)
            assert torch.equal(nan_x, nan_y), f"step {step + 1}: NaNs in other places"
            assert torch.equal(_bits(x)[~nan_x], _bits(y)[~nan_y]), f"step {step + 1}"
    p, m, v = got[-1]
    # the rules were exercised: infinite and NaN moments, NaN params
    assert torch.isinf(m).any() and torch.isnan(m).any() and torch.isinf(v).any()
    assert torch.isnan(p).any()


# (fp32 params with int8 or bf16 state: the AVX2 variants' hand-vectorized loops, the base
# variant's compiled ones)
SIMD_CASES = [(torch.bfloat16, "int8", "kahan"), (torch.bfloat16, "bf16", "stochastic"),
              (torch.bfloat16, "int8", "nearest"), (torch.bfloat16, "bf16", "nearest"),
              (torch.float32, "int8", "nearest"), (torch.float32, "bf16", "nearest")]


def test_every_simd_variant_gives_the_reference_bits():
    want = {case: _run("reference", *case, {}, steps=3)[0] for case in SIMD_CASES}
    before = torch.ops.onepass._cpu_isa()
    try:
        for isa in torch.ops.onepass._cpu_isa_supported():
            torch.ops.onepass._cpu_isa_set(isa)
            for case in SIMD_CASES:
                got = _run("cpu", *case, {}, steps=3)[0]
                assert all(_equal(a, b) for a, b in zip(got, want[case])), (isa, case)
    finally:
        torch.ops.onepass._cpu_isa_set(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_bits(threads):
    shapes = [(300, 1000), (100, 3000)]
    want = _run("reference", torch.float32, "int8", "nearest", {}, shapes=shapes, steps=2)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run("cpu", torch.float32, "int8", "nearest", {}, shapes=shapes, steps=2)[0]
    finally:
        torch.set_num_threads(before)
    assert all(_equal(a, b) for a, b in zip(got, want))



@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_bf16_state_across_65536_index_blocks_matches_reference(dtype, threads):
    # bf16 state keys its random bits once per 65536-index block (bf16_state_avx2.h): tensors that
    # span several blocks, split between threads mid-block, against the reference
    shapes = [(300, 1000), (70001,), (3, 65537)]
    want = _run("reference", dtype, "bf16", "nearest", {}, shapes=shapes, steps=2)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run("cpu", dtype, "bf16", "nearest", {}, shapes=shapes, steps=2)[0]
    finally:
        torch.set_num_threads(before)
    assert all(_equal(a, b) for a, b in zip(got, want))

def _lowp_args(fmt="int8"):
    from onepass import quant, reference

    params = [torch.randn(4, 300) for _ in range(2)]
    shape = reference.absmax_shape((4, 300))
    sdt = torch.uint8 if fmt == "int8" else torch.bfloat16
    args = dict(
        params=params, grads=[torch.randn(4, 300) for _ in range(2)],
        exp_avgs=[torch.zeros(4, 300, dtype=sdt) for _ in range(2)],
        exp_avg_sqs=[torch.zeros(4, 300, dtype=sdt) for _ in range(2)],
        max_exp_avg_sqs=[], steps=[torch.zeros(()) for _ in range(2)],
    )
    kw = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              amsgrad=False, maximize=False, decoupled=True, grad_scale=None, found_inf=None,
              state_format=fmt,
              exp_avg_absmaxs=[torch.zeros(shape) for _ in range(2)] if fmt == "int8" else [],
              exp_avg_sq_absmaxs=[torch.zeros(shape) for _ in range(2)] if fmt == "int8" else [],
              qtables=quant.tables() if fmt == "int8" else None, param_rounding="nearest",
              kahan_comps=[], seed=0)
    return args, kw


@pytest.mark.parametrize("entry", ["op", "direct"])
@pytest.mark.parametrize("bad,match", [
    ("absmax_shape", "exp_avg_absmaxs\\[1\\] must be a contiguous float32"),
    ("no_tables", "needs qtables"),
    ("state_dtype", "must be Byte"),
    ("amsgrad", "amsgrad needs"),
    ("rounding_fp32", "is for bfloat16 params"),
    ("format", "unknown state format"),
    ("kahan_missing", "one compensation per param"),
])
def test_lowp_rejects_bad_batches_and_writes_nothing(entry, bad, match):
    args, kw = _lowp_args()
    if bad == "absmax_shape":
        kw["exp_avg_absmaxs"][1] = torch.zeros(4, 1)
    elif bad == "no_tables":
        kw["qtables"] = None
    elif bad == "state_dtype":
        args["exp_avgs"][1] = torch.zeros(4, 300)
    elif bad == "amsgrad":
        kw["amsgrad"] = True
        args["max_exp_avg_sqs"] = [torch.zeros(4, 300) for _ in range(2)]
    elif bad == "rounding_fp32":
        kw["param_rounding"] = "stochastic"
    elif bad == "format":
        kw["state_format"] = "int4"
    elif bad == "kahan_missing":
        args["params"] = [p.bfloat16() for p in args["params"]]
        args["grads"] = [g.bfloat16() for g in args["grads"]]
        kw["param_rounding"] = "kahan"
    before = {k: [t.clone() for t in v] for k, v in args.items()}
    before_am = [t.clone() for t in kw["exp_avg_absmaxs"]]
    fn = torch.ops.onepass.adam_step_lowp_ if entry == "op" else _ops._C.adam_step_lowp_cpu
    with pytest.raises(RuntimeError, match=match):
        fn(*args.values(), **kw)
    for k, v in args.items():
        assert all(torch.equal(a, b) for a, b in zip(v, before[k])), k
    assert all(torch.equal(a, b) for a, b in zip(kw["exp_avg_absmaxs"], before_am))


def test_stream_key_matches_reference():
    # the first step's param stream: a bf16 param rounded stochastically with fp32 state, one
    # element per possible low half, against the reference's bits
    from onepass import reference

    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for seed in (0, 1, 2**32 - 1):
        p = torch.nn.Parameter(x.bfloat16())
        q = torch.nn.Parameter(x.bfloat16())
        for backend, t in (("cpu", p), ("reference", q)):
            t.grad = torch.ones_like(t)
            onepass.AdamW([t], lr=1e-3, backend=backend, param_rounding="stochastic",
                          seed=seed).step()
        assert torch.equal(p.view(torch.int16), q.view(torch.int16)), seed
    assert reference.stream_key(5, 7, 1) == reference.mix32((5 + 0x9E3779B9 * 29) & 0xFFFFFFFF)


# ---- the float3 maps' bit-level search (adam_math.h float_map_*) ---------------------------------

def _search(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """reference.quantize_blocks' rule on already scaled values: midpoints below x, NaN -> 0."""
    q = torch.searchsorted(quant.midpoints("float3", signed), x)
    return torch.where(torch.isnan(x), torch.zeros_like(q), q).to(torch.uint8)


def _neighbours(x: torch.Tensor) -> torch.Tensor:
    """x and the float32 just below and just above each value."""
    return torch.cat([x, torch.nextafter(x, torch.tensor(-float("inf"))),
                      torch.nextafter(x, torch.tensor(float("inf")))])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_float_map_decoding_is_quants_table(signed):
    assert torch.equal(torch.ops.onepass._float_map_values(signed).view(torch.int32),
                       quant.code_table("float3", signed).view(torch.int32))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_float_map_search_equals_the_midpoint_search(signed):
    # every tie and its neighbours, every code, the specials, values past 1 (x * (1 / absmax)
    # may exceed 1 by an ulp), subnormals, and a wide random spread of both signs
    mid, code = quant.midpoints("float3", signed), quant.code_table("float3", signed)
    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(200_000, generator=gen) * torch.exp2(torch.randint(-140, 4, (200_000,), generator=gen).float())
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 2.0, -2.0,
                            1e-45, -1e-45, 1e-40, -1e-40, torch.finfo(torch.float32).tiny,
                            torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    x = torch.cat([_neighbours(mid), _neighbours(code), _neighbours(mid / 2), _neighbours(-mid),
                   special, _neighbours(special[5:]), spread])
    got = torch.ops.onepass._float_map_codes(x, signed)
    want = _search(x, signed)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), got[i].item(), want[i].item()) for i in bad[:5]]


@pytest.mark.parametrize("maps", [("dynamic", "dynamic"), ("power4", "float3"), ("float3", "power4")],
                         ids=lambda m: "/".join(m))
def test_table_search_maps_match_reference(maps, monkeypatch):
    # the kernel's general path (table loads and a search) for maps other than float3 on both sides
    monkeypatch.setattr(quant, "SIGNED_MAP", maps[0])
    monkeypatch.setattr(quant, "UNSIGNED_MAP", maps[1])
    for dtype, rnd in ((torch.float32, "nearest"), (torch.bfloat16, "kahan")):
        got = _run("cpu", dtype, "int8", rnd, {}, steps=3)[0]
        want = _run("reference", dtype, "int8", rnd, {}, steps=3)[0]
        assert all(_equal(a, b) for a, b in zip(got, want)), (maps, dtype)
