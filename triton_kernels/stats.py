"""The Triton kernels that add up the statistics' chunk partials the update kernels of adam.py
write (reference.update_statistics): ``stats_group_kernel`` sums each group of
reference.STATS_GROUP consecutive chunks of a param by the halving tree (float64, zero-padded),
one program per (param, group), and ``stats_sum_kernel`` adds each param's group sums in float64,
in order from 0.0 (reference.sequential_sum), one program per param: a chain of at most a few
hundred adds per param. Float64 adds only, launched with enable_fp_fusion=False."""
import triton
import triton.language as tl


@triton.jit
def stats_group_kernel(part, gtab, gsum, GROUP: tl.constexpr, GROUP_LOG2: tl.constexpr):
    """Program j: gsum[2j], gsum[2j + 1] = reference.chunk_partials(·, GROUP) of the float64
    partials part[2c], part[2c + 1] for c in [gtab[2j], gtab[2j + 1]) (at most GROUP of them,
    zero-padded to GROUP): loaded as a [GROUP, 2] tile, whose rows are halved by the tree
    ``a[:h] + a[h:]`` (reshaped row-major to (2, h, 2), a sum over axis 0 is one IEEE add)."""
    j = tl.program_id(0).to(tl.int64)
    c0 = tl.load(gtab + 2 * j)
    c1 = tl.load(gtab + 2 * j + 1)
    c = c0 + tl.arange(0, GROUP)
    col = tl.arange(0, 2)
    a = tl.load(part + 2 * c[:, None] + col[None, :], mask=(c < c1)[:, None], other=0.0)
    for i in tl.static_range(GROUP_LOG2):
        a = tl.sum(tl.reshape(a, (2, GROUP >> (i + 1), 2)), axis=0)
    tl.store(gsum + 2 * j + col, tl.reshape(a, (2,)))


@triton.jit
def stats_sum_kernel(part, ctab, out, U: tl.constexpr, found_inf=None, SKIP: tl.constexpr = False):
    """Program i: out[2i], out[2i + 1] = the float64 sums, in order from 0.0, of the values
    part[2c], part[2c + 1] for c in [ctab[2i], ctab[2i + 1]) (reference.sequential_sum; for the
    statistics, param i's group sums from stats_group_kernel). A strictly sequential chain of
    adds; U scalar loads per round are issued ahead of their adds. SKIP: nothing is written when
    found_inf[0] is non-zero (a step the GradScaler skips reports the NaN it was given)."""
    if SKIP:
        if tl.load(found_inf) != 0:
            return
    i = tl.program_id(0).to(tl.int64)
    c0 = tl.load(ctab + 2 * i)
    c1 = tl.load(ctab + 2 * i + 1)
    acc_w = tl.full((), 0.0, tl.float64)
    acc_d = tl.full((), 0.0, tl.float64)
    for base in range(c0, c1, U):
        for j in tl.static_range(U):
            c = base + j
            ok = c < c1
            xw = tl.load(part + 2 * c, mask=ok, other=0.0)
            xd = tl.load(part + 2 * c + 1, mask=ok, other=0.0)
            acc_w = tl.where(ok, acc_w + xw, acc_w)
            acc_d = tl.where(ok, acc_d + xd, acc_d)
    tl.store(out + 2 * i, acc_w)
    tl.store(out + 2 * i + 1, acc_d)
