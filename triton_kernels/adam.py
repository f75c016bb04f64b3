"""The Triton AdamW kernels: every tensor of a batch in one launch, bit-exact with onepass.reference.

``adam_kernel`` (fp32 or bf16 state): one program updates one BLOCK of one tensor.
``adam_int8_kernel`` (int8 state): one program updates QB whole quantization blocks of one
tensor. Both state the element math once, in ``adam_element``, and share the other jit helpers
(table search, per-step scalars, param load/store with stochastic or Kahan rounding, the hash).
The tensors are described by device tables, not by kernel arguments (so 2000 tensors are still
one launch, with no cap like torch's 36-tensor / 320-block multi_tensor_apply chunks). A launch
passes one float64 buffer ``tab`` of a step, T tensors: itab (T rows of ITAB_W int64 carried as
float64 bits), then ftab (T rows of 2), then hp (lr, beta1, beta2, eps, weight decay); one pointer
instead of three views saves the host ~5 us a launch (three Tensor slices in Python):

    itab[t] = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq addresses, numel)   int64
              + for low precision (ITAB_W = 12): Kahan compensation, exp_avg absmax and
              exp_avg_sq absmax addresses, the stream keys of the param and of the moments
              (reference.stream_key of the tensor's step), the int8 row length
    ftab[t] = (bias correction 1 - beta1**t, sqrt(1 - beta2**t) rounded)            float64
    starts[t] = first program of tensor t (cumulative program counts, starts[T] = grid size)

Random bits (stochastic rounding) are reference.random_bits of the element's index in the walk:
storage order of a dense tensor (the host passes a dense non-contiguous param as a permuted,
contiguous view), row-major for int8 state.

A program finds its tensor by binary search over ``starts``. The per-step scalars that depend on
the learning rate are computed here in float64 from the lr (a float, or a Tensor read on the
device: no host sync) and rounded once, exactly as reference.step_scalars does on the host.

Fused statistics (STATS, reference.update_statistics): the update kernels also write, for each
chunk of the walk (reference.STATS_CHUNK elements, or one int8 block), the sums of w*w and d*d
(w the param as stored after the step, d = w - the param as stored before, in the math dtype)
by reference.chunk_partials (adam_kernel updates its chunks row by row, STATS_LANES elements of
each at a time, adding the squares into lane accumulators; then the lanes' tree) as float64 to ``part[2*c]`` / ``part[2*c + 1]``, c = ``cbase[t]`` + the chunk's index in
tensor t. A program covers whole chunks (with STATS its BLOCK is a multiple of the chunk; an int8
program's blocks are chunks). The kernels of triton_kernels/stats.py then add the partials up.

Bit-exactness: launched with enable_fp_fusion=False (no FMA contraction); division and square
root are the correctly rounded div_rn / sqrt_rn (Triton's default float32 '/' and sqrt are
approximate on NVIDIA GPUs).
"""
import triton
import triton.language as tl

# Columns of itab. The first six are always there; the rest (ITAB_W = 12) only for bf16/int8
# state or stochastic/Kahan param rounding. Keys are the uint32 reference.stream_key of the
# tensor's step for the param's stream and the moments' (one stream for m and v:
# reference.moment_bits). (jit code reads the tl.constexpr copies.)
COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "numel",
           "comp", "absmax_m", "absmax_v", "key_p", "key_moments", "row_len")
ITAB_NARROW, ITAB_WIDE = 6, len(COLUMNS)
COL_COMP = tl.constexpr(6)
COL_ABSMAX_M = tl.constexpr(7)
COL_ABSMAX_V = tl.constexpr(8)
COL_KEY_P = tl.constexpr(9)
COL_KEY_MOMENTS = tl.constexpr(10)
COL_ROW_LEN = tl.constexpr(11)



@triton.jit
def div_ieee(a, b, F64: tl.constexpr):
    # float64 '/' is IEEE (div.rn.f64); float32 '/' is not, and div_rn takes float32 only.
    if F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def sqrt_ieee(a, F64: tl.constexpr):
    # float64 sqrt lowers to sqrt.rn.f64; float32 needs sqrt_rn (tl.sqrt is approximate).
    if F64:
        return tl.sqrt(a)
    else:
        return tl.math.sqrt_rn(a)


@triton.jit
def to_storage(x, P_DTYPE: tl.constexpr):
    """float32 -> param dtype, round to nearest even. bf16 is rounded bitwise, as in
    csrc/adam_math.h: Triton's interpreter rounds float32 -> bf16 half-up without carrying into
    the exponent (so CI would test a different rounding than the GPU's cvt.rn.bf16.f32)."""
    if P_DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)  # NaN, as torch writes it
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(P_DTYPE)


@triton.jit
def adam_element(p, g, m, v, v_max, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                 weight_decay, decay, step_size, inv_bc2_sqrt, grad_scale,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr,
                 SCALED: tl.constexpr, F64: tl.constexpr):
    """The element math of reference.py, in its order (the Triton statement of it)."""
    if SCALED:
        g = div_ieee(g, grad_scale, F64)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = g + weight_decay * p
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    vh = v
    if AMSGRAD:
        vh = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
    denom = sqrt_ieee(vh, F64) * inv_bc2_sqrt + eps
    p = p * decay - step_size * div_ieee(m, denom, F64)
    return p, m, v, vh


@triton.jit
def mix32(x):
    """reference.mix32 on uint32 (logical shifts, multiplications mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def random_bits(key, index):
    """reference.random_bits: 32 random bits (uint32) per int64 element index, uint32 key."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    hi = hi * 0x85EBCA6B
    return mix32((lo ^ hi) ^ key)


@triton.jit
def round_bf16_stochastic(x, bits):
    """reference.round_bf16_stochastic: add the low 16 random bits to the float32 bit pattern and
    keep the high half; non-finite values round to nearest."""
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + (bits & 0xFFFF)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    finite = (u & 0x7FFFFFFF) < 0x7F800000
    return tl.where(finite, r, to_storage(x, tl.bfloat16))


@triton.jit
def load_param(p_ptr, c_ptr, offs, mask, MATH: tl.constexpr, KAHAN: tl.constexpr):
    """(the param's value in the math dtype (Kahan: p + its bf16 compensation, one add), the
    param as stored)."""
    raw = tl.load(p_ptr + offs, mask=mask)
    p = raw.to(MATH)
    if KAHAN:
        p = p + tl.load(c_ptr + offs, mask=mask).to(MATH)
    return p, raw


@triton.jit
def store_param(p_ptr, c_ptr, offs, mask, p, key, P_DTYPE: tl.constexpr, MATH: tl.constexpr,
                SR: tl.constexpr, KAHAN: tl.constexpr):
    """Writes the new param: nearest even, stochastic (bf16, keyed by the element index ``offs``)
    or nearest plus a nearest-rounded bf16 compensation (Kahan). Returns what it stored."""
    if SR:
        stored = round_bf16_stochastic(p, random_bits(key, offs))
        tl.store(p_ptr + offs, stored, mask=mask)
    elif KAHAN:
        stored = to_storage(p, P_DTYPE)
        tl.store(p_ptr + offs, stored, mask=mask)
        tl.store(c_ptr + offs, to_storage(p - stored.to(MATH), P_DTYPE), mask=mask)
    else:
        stored = to_storage(p, P_DTYPE)
        tl.store(p_ptr + offs, stored, mask=mask)
    return stored


@triton.jit
def chunk_tree(x, NCH: tl.constexpr, CHUNK: tl.constexpr, LOG2: tl.constexpr):
    """The halving tree of reference.chunk_partials over NCH chunks of CHUNK = 2**LOG2 lanes (x:
    NCH * CHUNK elements, row-major): per chunk ``a[:h] + a[h:]`` until one element is left. Reshaped
    row-major to (NCH, 2, h), row 0 of a chunk is a[:h] and row 1 a[h:]; a sum of two values is
    one IEEE add. Returns [NCH]."""
    a = tl.reshape(x, (NCH, CHUNK))
    for i in tl.static_range(LOG2):
        a = tl.sum(tl.reshape(a, (NCH, 2, CHUNK >> (i + 1))), axis=1)
    return tl.reshape(a, (NCH,))


@triton.jit
def store_partials(sw, sd, part, cidx, cmask, NCH: tl.constexpr, LANES: tl.constexpr,
                   LOG2: tl.constexpr):
    """The statistics' chunk partials of one program: ``sw``, ``sd`` hold NCH chunks' lane sums
    of w*w and d*d (reference.update_statistics: w = the param as stored now, d = w - the param
    as stored before, in the math dtype); their halving trees go to part[2*cidx] and
    part[2*cidx + 1] as float64."""
    tl.store(part + 2 * cidx, chunk_tree(sw, NCH, LANES, LOG2).to(tl.float64), mask=cmask)
    tl.store(part + 2 * cidx + 1, chunk_tree(sd, NCH, LANES, LOG2).to(tl.float64), mask=cmask)


@triton.jit
def find_tensor(starts, pid, n_tensors, N_SEARCH: tl.constexpr):
    """The last tensor t with starts[t] <= pid (binary search)."""
    lo = pid * 0
    hi = lo + n_tensors - 1
    for _ in tl.static_range(N_SEARCH):
        mid = (lo + hi + 1) // 2
        ok = tl.load(starts + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def step_scalars(ftab, t, hp, lr_ptr, grad_scale_ptr, MATH: tl.constexpr, COUPLED: tl.constexpr,
                 SCALED: tl.constexpr, LR_TENSOR: tl.constexpr):
    """Per-step scalars: float64, IEEE operations, rounded once to the math dtype."""
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.load(hp + 0)
    beta1 = tl.load(hp + 1)
    beta2 = tl.load(hp + 2)
    eps = tl.load(hp + 3).to(MATH)
    wd64 = tl.load(hp + 4)
    bc1 = tl.load(ftab + t * 2)
    inv_bc2_sqrt = tl.load(ftab + t * 2 + 1).to(MATH)
    step_size = (lr / bc1).to(MATH)  # float64 division: IEEE
    if COUPLED:
        decay = tl.full((), 1.0, MATH)  # p * 1.0 is exact: the reference multiplies by 1 too
    else:
        decay = (1.0 - lr * wd64).to(MATH)
    if SCALED:
        grad_scale = tl.load(grad_scale_ptr).to(MATH)
    else:
        grad_scale = eps  # unused
    return (beta1.to(MATH), (1.0 - beta1).to(MATH), beta2.to(MATH), (1.0 - beta2).to(MATH), eps,
            wd64.to(MATH), decay, step_size, inv_bc2_sqrt, grad_scale)


@triton.jit
def update_elements(row, p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, mask, beta1, one_minus_beta1,
                    beta2, one_minus_beta2, eps, wd, decay, step_size, inv_bc2_sqrt, grad_scale,
                    P_DTYPE: tl.constexpr, MATH: tl.constexpr, AMSGRAD: tl.constexpr,
                    MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr, SCALED: tl.constexpr,
                    STATE_BF16: tl.constexpr, SR: tl.constexpr, KAHAN: tl.constexpr):
    """adam_kernel's update of the elements ``offs`` (any shape) of the tensor of itab ``row``.
    Returns (the param as stored now, the param as stored before)."""
    p, p_raw = load_param(p_ptr, c_ptr, offs, mask, MATH, KAHAN)
    g = tl.load(g_ptr + offs, mask=mask).to(MATH)
    m = tl.load(m_ptr + offs, mask=mask).to(MATH)
    v = tl.load(v_ptr + offs, mask=mask).to(MATH)
    if AMSGRAD:
        vm_ptr = tl.load(row + 4).to(tl.pointer_type(MATH))
        v_max = tl.load(vm_ptr + offs, mask=mask)
    else:
        v_max = v
    p, m, v, vh = adam_element(
        p, g, m, v, v_max, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay,
        step_size, inv_bc2_sqrt, grad_scale, AMSGRAD, MAXIMIZE, COUPLED, SCALED, MATH == tl.float64)
    if SR:
        key_p = tl.load(row + COL_KEY_P).to(tl.uint32)
    else:
        key_p = 0
    stored = store_param(p_ptr, c_ptr, offs, mask, p, key_p, P_DTYPE, MATH, SR, KAHAN)
    if STATE_BF16:
        bits = random_bits(tl.load(row + COL_KEY_MOMENTS).to(tl.uint32), offs)
        # reference.moment_bits: m rounds with the low 16 bits, v with the high 16
        tl.store(m_ptr + offs, round_bf16_stochastic(m, bits), mask=mask)
        tl.store(v_ptr + offs, round_bf16_stochastic(v, bits >> 16), mask=mask)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        tl.store(vm_ptr + offs, vh, mask=mask)
    return stored, p_raw


@triton.jit
def tables(tab, n_tensors, ITAB_W: tl.constexpr):
    """(itab, ftab, hp): the three tables of the packed buffer ``tab`` of n_tensors rows."""
    itab = tab.to(tl.pointer_type(tl.int64), bitcast=True)
    ftab = tab + n_tensors * ITAB_W
    return itab, ftab, ftab + n_tensors * 2


@triton.jit
def adam_kernel(tab, starts, lr_ptr, grad_scale_ptr, n_tensors,
                N_SEARCH: tl.constexpr, P_DTYPE: tl.constexpr, MATH: tl.constexpr,
                BLOCK: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                COUPLED: tl.constexpr, SCALED: tl.constexpr, LR_TENSOR: tl.constexpr,
                ITAB_W: tl.constexpr = 6, STATE_BF16: tl.constexpr = False,
                SR: tl.constexpr = False, KAHAN: tl.constexpr = False,
                part=None, cbase=None, STATS: tl.constexpr = False,
                SCHUNK: tl.constexpr = 2048, SLANES: tl.constexpr = 16,
                SLANES_LOG2: tl.constexpr = 4, found_inf=None, SKIP: tl.constexpr = False):
    """fp32 (math dtype) or bf16 (STATE_BF16) moments, one BLOCK of one dense tensor a program,
    walked in storage order (the element index of the random streams). STATS: also the chunk
    partials of the statistics (BLOCK a multiple of SCHUNK: a program covers BLOCK // SCHUNK
    whole chunks of its tensor). SKIP: a program writes nothing when found_inf[0] is non-zero
    (the GradScaler's overflow, read on the device: no host sync)."""
    if SKIP:
        if tl.load(found_inf) != 0:
            return
    itab, ftab, hp = tables(tab, n_tensors, ITAB_W)
    pid = tl.program_id(0).to(tl.int64)
    t = find_tensor(starts, pid, n_tensors, N_SEARCH)
    row = itab + t * ITAB_W
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    if STATE_BF16:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.bfloat16))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.bfloat16))
    else:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(MATH))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(MATH))
    n = tl.load(row + 5)
    if KAHAN:
        c_ptr = tl.load(row + COL_COMP).to(tl.pointer_type(P_DTYPE))
    else:
        c_ptr = p_ptr
    (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay, step_size, inv_bc2_sqrt,
     grad_scale) = step_scalars(ftab, t, hp, lr_ptr, grad_scale_ptr, MATH, COUPLED, SCALED, LR_TENSOR)

    local = pid - tl.load(starts + t)  # the program's BLOCK within its tensor
    if STATS:
        # the program's BLOCK // SCHUNK chunks row by row (reference.chunk_partials): row r is
        # elements [r * SLANES, (r + 1) * SLANES) of each chunk, updated as an (NCH, SLANES) tile
        # whose squares go into the lane accumulators (0 + the first row's square is that
        # square; elements past the tensor add 0)
        chunk = local * (BLOCK // SCHUNK) + tl.arange(0, BLOCK // SCHUNK)  # index in the tensor
        base = chunk[:, None] * SCHUNK + tl.arange(0, SLANES)[None, :]
        acc_w = tl.zeros((BLOCK // SCHUNK, SLANES), MATH)
        acc_d = tl.zeros((BLOCK // SCHUNK, SLANES), MATH)
        # a loop, not unrolled (128 rows), and only over the rows the program's first chunk has
        # (its other chunks are whole ones, or past the tensor): a small tensor's missing rows are
        # masked out entirely, and adding them would add +0
        rows = tl.minimum(SCHUNK // SLANES, (n - local * BLOCK + SLANES - 1) // SLANES)
        for r in range(0, rows):
            offs = base + r * SLANES
            mask = offs < n
            stored, p_raw = update_elements(
                row, p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, mask, beta1, one_minus_beta1, beta2,
                one_minus_beta2, eps, wd, decay, step_size, inv_bc2_sqrt, grad_scale, P_DTYPE, MATH,
                AMSGRAD, MAXIMIZE, COUPLED, SCALED, STATE_BF16, SR, KAHAN)
            w = tl.where(mask, stored.to(MATH), 0.0)
            d = tl.where(mask, w - p_raw.to(MATH), 0.0)
            acc_w = acc_w + w * w
            acc_d = acc_d + d * d
        store_partials(acc_w, acc_d, part, tl.load(cbase + t) + chunk, chunk * SCHUNK < n,
                       BLOCK // SCHUNK, SLANES, SLANES_LOG2)
    else:
        offs = local * BLOCK + tl.arange(0, BLOCK)
        update_elements(row, p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, offs, offs < n, beta1,
                        one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay, step_size,
                        inv_bc2_sqrt, grad_scale, P_DTYPE, MATH, AMSGRAD, MAXIMIZE, COUPLED,
                        SCALED, STATE_BF16, SR, KAHAN)


# quant's "float3" maps by bits (csrc/adam_math.h float_map_*, where the rule is explained): codes
# are float32 patterns 2**20 apart counted down from 1.0.
_FM_TOP = 0x3F800000 >> 20
FM_ONE = tl.constexpr(0x3F800000)
FM_TOP = tl.constexpr(_FM_TOP)
FM_LOW_V = tl.constexpr(_FM_TOP - 254)
FM_LOW_P = tl.constexpr(_FM_TOP - 126)
FM_LOW_N = tl.constexpr(_FM_TOP - 127)
FM_HALF_V = tl.constexpr(((_FM_TOP - 254) << 20) - 0x00800000)
FM_HALF_P = tl.constexpr(((_FM_TOP - 126) << 20) - 0x00800000)
FM_HALF_N = tl.constexpr(((_FM_TOP - 127) << 20) - 0x00800000)


@triton.jit
def float_map_value(q, SIGNED: tl.constexpr):
    """The float3 map's code q (int32 0..255) as float32, with integer operations."""
    if SIGNED:
        d = tl.where(q > 128, 255 - q, q)
        b = (FM_ONE - (d << 20)) | tl.where(q < 128, -2147483648, 0)  # sign bit
        b = tl.where(q == 128, 0, b)
    else:
        b = tl.where(q == 0, 0, FM_ONE - ((255 - q) << 20))
    return b.to(tl.float32, bitcast=True)


@triton.jit
def float_map_code(y, SIGNED: tl.constexpr):
    """The float3 map's nearest code (int32) of float32 y: its bit pattern rounded at bit 20."""
    u = y.to(tl.int32, bitcast=True)
    if SIGNED:
        a = u & 0x7FFFFFFF
        neg = u < 0
        # a NaN's pattern may wrap here: its code is overwritten with 0 below
        r = (a + tl.where(neg, 0x80000, 0x7FFFF)) >> 20
        qp = tl.where(a > FM_HALF_P, 129 + tl.minimum(tl.maximum(r, FM_LOW_P), FM_TOP) - FM_LOW_P, 128)
        qn = tl.where(a >= FM_HALF_N, FM_TOP - tl.minimum(tl.maximum(r, FM_LOW_N), FM_TOP), 128)
        q = tl.where(a > 0x7F800000, 0, tl.where(neg, qn, qp))
    else:
        r = (u + 0x7FFFF) >> 20
        q = tl.where((u > FM_HALF_V) & (u <= 0x7F800000),
                     tl.minimum(tl.maximum(r, FM_LOW_V), FM_TOP) - FM_LOW_V + 1, 0)
    return q


@triton.jit
def dequantize(q_ptr, offs, mask, absmax, code_ptr, FMAP: tl.constexpr, SIGNED: tl.constexpr):
    """reference.dequantize_blocks on a [QB, QBLOCK] tile: code[q] * absmax of its block."""
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    if FMAP:
        code = float_map_value(q, SIGNED)
    else:
        code = tl.load(code_ptr + q)
    return tl.where(mask, code * absmax[:, None], 0.0)  # masked lanes: 0


@triton.jit
def quantize(x, mask, mid_ptr, FMAP: tl.constexpr, SIGNED: tl.constexpr):
    """reference.quantize_blocks on a [QB, QBLOCK] tile whose rows are blocks: (codes uint8,
    absmax [QB]). absmax propagates NaN by a separate flag (tl.max's NaN handling differs between
    the interpreter and GPUs); the code is the number of the 255 midpoints below x * (1 / absmax):
    by rounding bits for the float3 maps (FMAP), else by a branchless binary search of 8 gathers."""
    isnan = (x != x) & mask
    absmax = tl.max(tl.where(mask & (x == x), tl.abs(x), 0.0), axis=1)
    absmax = tl.where(tl.max(isnan.to(tl.int32), axis=1) > 0, float("nan"), absmax)
    # the block's scale 1 / absmax: 0 unless absmax is a normal finite float (reference)
    usable = (absmax >= 1.1754943508222875e-38) & (absmax < float("inf"))
    inv = tl.where(usable, div_ieee(tl.full(absmax.shape, 1.0, tl.float32),
                                    tl.where(usable, absmax, 1.0), False), 0.0)
    xn = x * inv[:, None]
    if FMAP:
        q = float_map_code(xn, SIGNED)
    else:
        q = tl.zeros(x.shape, dtype=tl.int32)
        for s in tl.static_range(8):
            q = tl.where(tl.load(mid_ptr + q + ((128 >> s) - 1)) < xn, q + (128 >> s), q)
        q = tl.where(xn != xn, 0, q)
    if not SIGNED:  # reference.quantize_blocks' keep_positive: a positive v never gets code 0
        q = tl.where((q == 0) & (xn > 0.0), 1, q)
    return q.to(tl.uint8), absmax


@triton.jit
def adam_int8_kernel(tab, starts, lr_ptr, grad_scale_ptr, qtab, n_tensors,
                     N_SEARCH: tl.constexpr, P_DTYPE: tl.constexpr, QB: tl.constexpr,
                     QBLOCK: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED: tl.constexpr,
                     SCALED: tl.constexpr, LR_TENSOR: tl.constexpr, ITAB_W: tl.constexpr,
                     SR: tl.constexpr, KAHAN: tl.constexpr, CODE_M: tl.constexpr,
                     MID_M: tl.constexpr, CODE_V: tl.constexpr, MID_V: tl.constexpr,
                     FMAP: tl.constexpr, part=None, cbase=None, STATS: tl.constexpr = False,
                     QBLOCK_LOG2: tl.constexpr = 8, found_inf=None, SKIP: tl.constexpr = False):
    """int8 moments: a program updates QB whole blocks (QBLOCK elements of one dim-0 row each;
    the tensor is contiguous, walked row-major) as a [QB, QBLOCK] tile. STATS: the blocks are
    the statistics' chunks (chunk index = block index = absmax index). SKIP: as adam_kernel."""
    if SKIP:
        if tl.load(found_inf) != 0:
            return
    itab, ftab, hp = tables(tab, n_tensors, ITAB_W)
    pid = tl.program_id(0).to(tl.int64)
    t = find_tensor(starts, pid, n_tensors, N_SEARCH)
    row = itab + t * ITAB_W
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
    n = tl.load(row + 5)
    am_ptr = tl.load(row + COL_ABSMAX_M).to(tl.pointer_type(tl.float32))
    av_ptr = tl.load(row + COL_ABSMAX_V).to(tl.pointer_type(tl.float32))
    length = tl.load(row + COL_ROW_LEN)
    if KAHAN:
        c_ptr = tl.load(row + COL_COMP).to(tl.pointer_type(P_DTYPE))
    else:
        c_ptr = p_ptr
    (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay, step_size, inv_bc2_sqrt,
     grad_scale) = step_scalars(ftab, t, hp, lr_ptr, grad_scale_ptr, tl.float32, COUPLED, SCALED,
                                LR_TENSOR)

    per_row = (length + QBLOCK - 1) // QBLOCK
    blk = (pid - tl.load(starts + t)) * QB + tl.arange(0, QB)  # block index = absmax index
    bmask = blk < (n // length) * per_row
    in_row = (blk % per_row)[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    offs = (blk // per_row)[:, None] * length + in_row  # row-major element index
    mask = bmask[:, None] & (in_row < length)
    p, p_raw = load_param(p_ptr, c_ptr, offs, mask, tl.float32, KAHAN)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = dequantize(m_ptr, offs, mask, tl.load(am_ptr + blk, mask=bmask, other=0.0), qtab + CODE_M,
                   FMAP, True)
    v = dequantize(v_ptr, offs, mask, tl.load(av_ptr + blk, mask=bmask, other=0.0), qtab + CODE_V,
                   FMAP, False)
    p, m, v, vh = adam_element(
        p, g, m, v, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, wd, decay,
        step_size, inv_bc2_sqrt, grad_scale, False, MAXIMIZE, COUPLED, SCALED, False)
    if SR:
        key_p = tl.load(row + COL_KEY_P).to(tl.uint32)
    else:
        key_p = 0
    stored = store_param(p_ptr, c_ptr, offs, mask, p, key_p, P_DTYPE, tl.float32, SR, KAHAN)
    if STATS:
        # a block is one row of the chunk's lanes (reference.STATS_LANES == INT8_BLOCK)
        w = tl.where(mask, stored.to(tl.float32), 0.0)
        d = tl.where(mask, w - p_raw.to(tl.float32), 0.0)
        store_partials(w * w, d * d, part, tl.load(cbase + t) + blk, bmask, QB, QBLOCK,
                       QBLOCK_LOG2)
    qm, am = quantize(m, mask, qtab + MID_M, FMAP, True)
    qv, av = quantize(v, mask, qtab + MID_V, FMAP, False)
    tl.store(m_ptr + offs, qm, mask=mask)
    tl.store(v_ptr + offs, qv, mask=mask)
    tl.store(am_ptr + blk, am, mask=bmask)
    tl.store(av_ptr + blk, av, mask=bmask)
