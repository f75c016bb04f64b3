"""How many steps until decoupled weight decay alone halves a weight, measured against the formulas.

    python examples/decay_half_life.py          # 9 (lr, weight_decay) pairs, ~40-50 s on 2 cores
    python examples/decay_half_life.py --tiny   # the pairs with lr * wd >= 1e-3 only (the CI test)

With every gradient exactly 0, Adam's moments stay 0 and its update m / (sqrt(v) + eps) is 0 / eps
= 0, so a step of onepass.AdamW is p <- p * (1 - lr * wd) and nothing else: after n steps
p_n = (1 - lr*wd)^n p_0. The weight has halved after

    exact:  ln 0.5 / ln(1 - lr*wd) steps     (decay_half_life below, = onepass.decay_half_life)
    approx: ln 2 / (lr*wd) steps             (the usual small-lr*wd form; too long by ~lr*wd/2)

and since steps are whole, the measured count (first n with |p_n| <= |p_0| / 2) should be the exact
value rounded up: within 1 step of it. That holds in float64. In float32 the factor 1 - lr*wd is
itself rounded to float32 (spacing 2^-24 ~ 6e-8 just below 1), which at lr*wd = 1e-5 is a relative
error of up to ~0.3% in the decay rate, so the measured half-life may drift by a few hundred steps
from the float64 formula while matching ln 0.5 / ln(float32(1 - lr*wd)); the table shows both.

For contrast the script also runs onepass.Adam(weight_decay=wd) (Adam + L2, "coupled") on the same
zero-gradient weights: there wd * p becomes the gradient and Adam normalizes it away, so each step
moves p by up to lr towards 0 whatever wd is: a weight of size |p_0| takes roughly |p_0| / (2 lr)
steps to halve (somewhat more, as m/sqrt(v) falls below 1 while the "gradient" wd * p shrinks; at
large lr it overshoots 0 and oscillates): linear and magnitude dependent, not a half-life at all.

Prints the tables and a final ``RESULT {json}`` line; writes ``decay_half_life.png``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

import onepass
from _common import base_parser, have_matplotlib  # examples/_common.py (the script's folder)

# (lr, weight_decay): lr * wd from 1e-5 (69k steps) to 0.5 (1 step). Two pairs share lr*wd = 1e-3
# with a 10x different lr: only the product matters.
PAIRS = [(1e-3, 0.01), (1e-3, 0.1), (3e-4, 1.0), (1e-3, 1.0), (1e-2, 0.1), (1e-2, 1.0),
         (0.1, 0.5), (0.1, 1.0), (0.5, 1.0)]


def decay_half_life_local(lr: float, weight_decay: float) -> float:
    """Exact half-life under decoupled decay alone: ln 0.5 / ln(1 - lr * weight_decay) steps."""
    shrink = float(lr) * float(weight_decay)
    if shrink == 0.0:
        return math.inf
    # log1p: ln(1 - x) stays accurate for tiny x, where 1 - x would lose digits
    return math.log(0.5) / math.log1p(-shrink)


# The library's own version (onepass.decay_half_life: the same formula) when this onepass has it.
decay_half_life = getattr(onepass, "decay_half_life", None) or decay_half_life_local
HALF_LIFE_SOURCE = "onepass.decay_half_life" if getattr(onepass, "decay_half_life", None) else "local"


def decay_half_life_approx(lr: float, weight_decay: float) -> float:
    """The small-lr*wd approximation ln 2 / (lr * weight_decay)."""
    return math.log(2.0) / (float(lr) * float(weight_decay))


def decay_half_life_float32(lr: float, weight_decay: float) -> float:
    """The exact formula with the per-step factor rounded to float32, as a float32 param sees it."""
    factor = torch.tensor(1.0 - float(lr) * float(weight_decay), dtype=torch.float64).float().double()
    return math.log(0.5) / math.log(float(factor))


def measure(opt_cls, lr: float, wd: float, dtype: torch.dtype, p0: torch.Tensor, max_steps: int):
    """Steps until each element of p0 is at most half its start (|p| <= |p0| / 2), per element,
    with every gradient exactly zero. Returns a list of counts (None: not within max_steps)."""
    p = torch.nn.Parameter(p0.to(dtype).clone())
    opt = opt_cls([p], lr=lr, weight_decay=wd)
    target = p0.to(dtype).abs() / 2
    crossed = torch.full(p0.shape, -1, dtype=torch.long)
    zero = torch.zeros_like(p)
    for n in range(1, max_steps + 1):
        p.grad = zero.clone()   # exactly 0 every step (the optimizer never writes the grad)
        opt.step()
        newly = (crossed < 0) & (p.detach().abs() <= target)
        if newly.any():
            crossed[newly] = n
            if (crossed >= 0).all():
                break
    return [int(c) if c >= 0 else None for c in crossed]


def run(pairs, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # 16 weights of assorted signs and sizes (1e-3 .. 10): a multiplicative decay halves them all
    # at the same step (up to a rounding step).
    p0 = torch.randn(16, generator=gen, dtype=torch.float64) * torch.logspace(-3, 1, 16, dtype=torch.float64)
    rows = []
    for lr, wd in pairs:
        exact = decay_half_life(lr, wd)
        max_steps = int(exact * 1.05) + 10
        row = {"lr": lr, "weight_decay": wd, "lr_wd": lr * wd, "exact": exact,
               "approx": decay_half_life_approx(lr, wd), "exact_f32_factor": decay_half_life_float32(lr, wd)}
        for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
            counts = measure(onepass.AdamW, lr, wd, dtype, p0, max_steps)
            if any(c is None for c in counts):
                row[f"measured_{name}"] = None
                row[f"measured_{name}_spread"] = None
            else:
                row[f"measured_{name}"] = max(counts)
                row[f"measured_{name}_spread"] = max(counts) - min(counts)
        # Adam + L2 on weights of size 1 and 0.1: ~0.5/lr and ~0.05/lr steps whatever wd is.
        l2 = measure(onepass.Adam, lr, wd, torch.float32, torch.tensor([1.0, 0.1], dtype=torch.float64),
                     max_steps=max(int(2.0 / lr) + 10, 10))
        row["adam_l2_p1"], row["adam_l2_p01"] = l2
        rows.append(row)
    return rows


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["lr_wd"] for r in rows]
    xs = [10 ** (k / 20) for k in range(-110, 0)]
    xs = [v for v in xs if v <= max(x) * 1.2]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    ax1.plot(xs, [math.log(0.5) / math.log1p(-v) for v in xs], "-", color="k", lw=1,
             label="exact  ln 0.5 / ln(1 - lr wd)")
    ax1.plot(xs, [math.log(2) / v for v in xs], "--", color="tab:gray", lw=1, label="approx  ln 2 / (lr wd)")
    ax1.scatter(x, [r["measured_f64"] for r in rows], marker="o", s=50, facecolors="none",
                edgecolors="tab:blue", label="measured, AdamW float64")
    ax1.scatter(x, [r["measured_f32"] for r in rows], marker="x", s=30, color="tab:red",
                label="measured, AdamW float32")
    ax1.scatter(x, [r["adam_l2_p1"] for r in rows], marker="^", s=25, color="tab:green",
                label="Adam + L2, |p0| = 1 (not exponential)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("lr * weight_decay")
    ax1.set_ylabel("steps until the weight halves (zero gradient)")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)

    def diff(key):
        return [r[key] - r["exact"] if r[key] is not None else float("nan") for r in rows]

    # In steps, not relative: the count is a whole number, so "measured - exact" lies in [0, 1)
    # when the formula holds (shaded), and the approximation is off by ~ln 2 / 2 = 0.35 steps at
    # any lr*wd (relative error lr*wd/2, absolute error about constant).
    ax2.axhspan(0, 1, color="tab:blue", alpha=0.08, label="[0, 1): exact, rounded up to a whole step")
    ax2.plot(x, diff("approx"), "--", marker=".", color="tab:gray", label="ln 2 / (lr wd) - exact")
    ax2.plot(x, diff("exact_f32_factor"), "_", ms=14, mew=2, color="tab:orange",
             label="ln 0.5 / ln(float32(1 - lr wd)) - exact")
    ax2.plot(x, diff("measured_f64"), "o", mfc="none", ms=8, color="tab:blue", label="measured float64 - exact")
    ax2.plot(x, diff("measured_f32"), "x", color="tab:red", label="measured float32 - exact")
    ax2.set_xscale("log")
    ax2.set_yscale("symlog", linthresh=1.0)
    lows = [v for k in ("measured_f32", "measured_f64", "exact_f32_factor") for v in diff(k) if v == v]
    ax2.set_ylim(min(-2.0, 2.0 * min(lows, default=0.0)), 5.0)
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xlabel("lr * weight_decay")
    ax2.set_ylabel("steps minus the exact formula (symlog)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7)
    fig.suptitle("onepass.AdamW, gradients = 0: measured half-life vs ln 0.5 / ln(1 - lr wd)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = base_parser(__doc__, "only the pairs with lr * wd >= 1e-3 (a few seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = [pw for pw in PAIRS if pw[0] * pw[1] >= 1e-3] if args.tiny else PAIRS

    t0 = time.perf_counter()
    rows = run(pairs, args.seed)
    wall = time.perf_counter() - t0

    def fmt(v, spec=".0f"):
        return "-" if v is None else format(v, spec)

    print(f"onepass.AdamW with zero gradients: steps until |p| <= |p0|/2 (16 weights of size 1e-3..10; "
          f"exact formula from {HALF_LIFE_SOURCE}); {wall:.1f} s")
    print(f"{'lr':>7} {'wd':>5} {'lr*wd':>7} {'ln2/(lr wd)':>11} {'exact':>10} {'f32 factor':>10} "
          f"{'meas f64':>8} {'meas f32':>8} {'f64-exact':>9} {'f32-exact':>9}")
    for r in rows:
        d64 = None if r["measured_f64"] is None else r["measured_f64"] - r["exact"]
        d32 = None if r["measured_f32"] is None else r["measured_f32"] - r["exact"]
        print(f"{r['lr']:>7g} {r['weight_decay']:>5g} {r['lr_wd']:>7.0e} {r['approx']:>11.2f} "
              f"{r['exact']:>10.2f} {r['exact_f32_factor']:>10.2f} {fmt(r['measured_f64'], 'd'):>8} "
              f"{fmt(r['measured_f32'], 'd'):>8} {fmt(d64, '+.2f'):>9} {fmt(d32, '+.2f'):>9}")
    spread = max((r[k] or 0) for r in rows for k in ("measured_f64_spread", "measured_f32_spread"))
    print(f"(all 16 weights of a run halved within {spread} step(s) of each other)")
    print("contrast, onepass.Adam(weight_decay=wd) (L2 through Adam), same zero gradients:")
    print(f"{'lr':>7} {'wd':>5} {'|p0|=1':>8} {'|p0|=0.1':>8} {'0.5/lr':>8}   (steps; about |p0|/(2 lr), whatever wd)")
    for r in rows:
        print(f"{r['lr']:>7g} {r['weight_decay']:>5g} {fmt(r['adam_l2_p1'], 'd'):>8} "
              f"{fmt(r['adam_l2_p01'], 'd'):>8} {0.5 / r['lr']:>8.0f}")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "decay_half_life.png")
    if have_matplotlib():
        plot(rows, png)
        print(f"plot: {png}")
    else:
        png = None
        print("plot: skipped (matplotlib is not installed)")
    print("RESULT " + json.dumps({"example": "decay_half_life", "png": png, "formula": HALF_LIFE_SOURCE,
                                   "wall_s": round(wall, 2), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
