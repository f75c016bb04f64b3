"""The Triton AdamW kernel: every tensor of a batch in one launch, bit-exact with onepass.reference.

One program updates one BLOCK of one tensor. The tensors are described by device tables, not by
kernel arguments (so 2000 tensors are still one launch, with no cap like torch's 36-tensor /
320-block multi_tensor_apply chunks):

    itab[t] = (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq addresses, numel)   int64
    ftab[t] = (bias correction 1 - beta1**t, sqrt(1 - beta2**t) rounded)            float64
    starts[t] = first program of tensor t (cumulative block counts, starts[T] = grid size)

A program finds its tensor by binary search over ``starts``. The per-step scalars that depend on
the learning rate are computed here in float64 from the lr (a float, or a Tensor read on the
device: no host sync) and rounded once, exactly as reference.step_scalars does on the host.

Bit-exactness: launched with enable_fp_fusion=False (no FMA contraction); division and square
root are the correctly rounded div_rn / sqrt_rn (Triton's default float32 '/' and sqrt are
approximate on NVIDIA GPUs).
"""
import triton
import triton.language as tl


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
                 weight_decay, decay, step_size, bc2_sqrt, grad_scale,
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
    denom = div_ieee(sqrt_ieee(vh, F64), bc2_sqrt, F64) + eps
    p = p * decay - step_size * div_ieee(m, denom, F64)
    return p, m, v, vh


@triton.jit
def adam_kernel(itab, ftab, starts, hp, lr_ptr, grad_scale_ptr, n_tensors,
                N_SEARCH: tl.constexpr, P_DTYPE: tl.constexpr, MATH: tl.constexpr,
                BLOCK: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                COUPLED: tl.constexpr, SCALED: tl.constexpr, LR_TENSOR: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # Binary search: the last tensor t with starts[t] <= pid.
    lo = pid * 0
    hi = lo + n_tensors - 1
    for _ in tl.static_range(N_SEARCH):
        mid = (lo + hi + 1) // 2
        ok = tl.load(starts + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    t = lo
    row = itab + t * 6
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(MATH))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(MATH))
    n = tl.load(row + 5)

    # Per-step scalars: float64, IEEE operations, rounded once to the math dtype.
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.load(hp + 0)
    beta1 = tl.load(hp + 1)
    beta2 = tl.load(hp + 2)
    eps = tl.load(hp + 3).to(MATH)
    wd64 = tl.load(hp + 4)
    bc1 = tl.load(ftab + t * 2)
    bc2_sqrt = tl.load(ftab + t * 2 + 1).to(MATH)
    step_size = (lr / bc1).to(MATH)  # float64 division: IEEE
    if COUPLED:
        decay = 1.0  # p * 1.0 is exact: the reference multiplies by 1 too
    else:
        decay = (1.0 - lr * wd64).to(MATH)
    if SCALED:
        grad_scale = tl.load(grad_scale_ptr).to(MATH)
    else:
        grad_scale = eps  # unused

    offs = (pid - tl.load(starts + t)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(MATH)
    g = tl.load(g_ptr + offs, mask=mask).to(MATH)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if AMSGRAD:
        vm_ptr = tl.load(row + 4).to(tl.pointer_type(MATH))
        v_max = tl.load(vm_ptr + offs, mask=mask)
    else:
        v_max = v
    p, m, v, vh = adam_element(
        p, g, m, v, v_max, beta1.to(MATH), (1.0 - beta1).to(MATH), beta2.to(MATH),
        (1.0 - beta2).to(MATH), eps, wd64.to(MATH), decay, step_size, bc2_sqrt, grad_scale,
        AMSGRAD, MAXIMIZE, COUPLED, SCALED, MATH == tl.float64)
    tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        tl.store(vm_ptr + offs, vh, mask=mask)
