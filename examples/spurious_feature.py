"""AdamW vs Adam + L2 on a task with a causal feature set and a large-scale spurious feature.

    python examples/spurious_feature.py           # 7 lambdas x 2 optimizers x 2 scales x 3 seeds, ~45 s
    python examples/spurious_feature.py --tiny    # seconds (the CI smoke test)

Data (binary label y, s = +1/-1 for y = 1/0):
    causal:   4 features x_i = 0.5 s + N(0, 1.5^2): each weakly predictive, always (together
              ~75% accurate on their own)
    spurious: 1 feature  x_s = scale * (a s + N(0, 0.5^2)), a = +1 with probability p_agree, else
              -1: in training p_agree = 0.9 (it alone gives ~90%), at test the correlation breaks.
The spurious feature has a 10x larger scale (``--scale``), so its gradient, and Adam's second
moment v for its weight, is ~10x (~100x) that of a causal weight.

Test sets (5000 points each): "iid" (p_agree = 0.9, as in training), "random" (p_agree = 0.5: the
spurious feature carries no information) and "flipped" (p_agree = 0.1: anti-correlated).

Model and training: logistic regression (weights w from 0, bias b), full batch of 2000 points,
lr 0.01, 2000 steps, betas (0.9, 0.999). Decay on w only (no bias decay, the usual practice).
The same data and init for every run; 3 data seeds, averaged.
  * onepass.AdamW(weight_decay=lam): decoupled, w <- w (1 - lr lam) - lr m/(sqrt(v) + eps): every
    weight shrinks at the same rate, whatever its gradient scale.
  * onepass.Adam(weight_decay=lam): L2, lam w is added to the gradient before Adam normalizes, so
    the pull towards 0 on weight i is divided by sqrt(v_i): weak on the large-gradient spurious
    weight, strong on the small-gradient causal ones. (Its fixed point minimizes loss + lam/2 |w|^2,
    which also favors a large-scale feature: it needs a small weight for the same logit.)
The same lam means different strengths for the two (AdamW's shrink is lr lam per step; L2's is
lam w / sqrt(v) per step, normalized), so the script also plots the spurious reliance against how
much decay shrank the weights (|w| / |w at lam = 0|): the comparison at matched shrinkage.
Control: ``--control-scale`` (default 1) reruns everything with the spurious feature at the causal
features' scale: if a difference between the optimizers comes from the gradient scale, it should
shrink there.

Figures per run: w_spur (raw weight), w_spur*scale (logit per unit of the +-1 spurious signal),
|w_causal|, "spurious share" = the spurious feature's part of the mean logit margin on the
training distribution, w_s*scale*(2 p_agree - 1) / (that + sum_i 0.5 w_i), and the accuracies.
Prints a table and a final ``RESULT {json}`` line; writes ``spurious_feature.png``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import onepass
from _common import base_parser, have_matplotlib  # examples/_common.py (the script's folder)

N_CAUSAL = 4
CAUSAL_SIGNAL, CAUSAL_NOISE = 0.5, 1.5
SPURIOUS_NOISE = 0.5
P_TRAIN = 0.9
TESTS = {"iid": P_TRAIN, "random": 0.5, "flipped": 1.0 - P_TRAIN}


def make_data(n: int, p_agree: float, scale: float, gen: torch.Generator):
    """n points: [n, N_CAUSAL + 1] features (the spurious one last), labels 0/1."""
    y = (torch.rand(n, generator=gen) < 0.5).float()
    s = 2 * y - 1
    causal = CAUSAL_SIGNAL * s[:, None] + CAUSAL_NOISE * torch.randn(n, N_CAUSAL, generator=gen)
    agree = torch.where(torch.rand(n, generator=gen) < p_agree, 1.0, -1.0)
    spurious = scale * (agree * s + SPURIOUS_NOISE * torch.randn(n, generator=gen))
    return torch.cat([causal, spurious[:, None]], dim=1), y


def train(opt_name: str, lambdas, scale: float, seeds, n_train: int, n_test: int, steps: int, lr: float):
    """All lambdas and seeds of one optimizer at once: one (w, b) pair a lambda (its own param
    group), each [seeds, ...]; the loss is a sum over seeds, so each seed's model gets exactly its
    own gradient (logistic regression models do not interact)."""
    data = {}
    for k in ["train"] + list(TESTS):
        xs, ys = [], []
        for seed in seeds:
            # one generator per (seed, split): a split's data is the same in every run
            gen = torch.Generator().manual_seed(1000 * seed + ["train", *TESTS].index(k))
            x, y = make_data(n_train if k == "train" else n_test, P_TRAIN if k == "train" else TESTS[k],
                             scale, gen)
            xs.append(x)
            ys.append(y)
        data[k] = (torch.stack(xs), torch.stack(ys))     # [seeds, n, d], [seeds, n]
    d = N_CAUSAL + 1
    ws = [torch.nn.Parameter(torch.zeros(len(seeds), d, 1)) for _ in lambdas]
    bs = [torch.nn.Parameter(torch.zeros(len(seeds), 1, 1)) for _ in lambdas]
    groups = []
    for lam, w, b in zip(lambdas, ws, bs):
        groups += [{"params": [w], "weight_decay": lam}, {"params": [b], "weight_decay": 0.0}]
    opt_cls = onepass.AdamW if opt_name == "AdamW" else onepass.Adam
    opt = opt_cls(groups, lr=lr)
    x_tr, y_tr = data["train"]
    for _ in range(steps):
        loss = sum(F.binary_cross_entropy_with_logits(torch.bmm(x_tr, w) + b, y_tr[..., None],
                                                      reduction="none").mean((1, 2)).sum()
                   for w, b in zip(ws, bs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows = []
    with torch.no_grad():
        for lam, w, b in zip(lambdas, ws, bs):
            wc, wsp = w[:, :N_CAUSAL, 0], w[:, N_CAUSAL, 0]          # [seeds, 4], [seeds]
            margin_s = wsp * scale * (2 * P_TRAIN - 1)
            margin_c = CAUSAL_SIGNAL * wc.sum(1)
            row = {"optimizer": opt_name, "lambda": lam, "scale": scale,
                   "w_spur": wsp.mean().item(), "w_spur_x_scale": (wsp * scale).mean().item(),
                   "w_causal_norm": wc.norm(dim=1).mean().item(), "w_norm": w[..., 0].norm(dim=1).mean().item(),
                   "spurious_share": (margin_s / (margin_s + margin_c)).mean().item()}
            for k in ["train"] + list(TESTS):
                x, y = data[k]
                acc = (((torch.bmm(x, w) + b)[..., 0] > 0).float() == y).float().mean(1)   # [seeds]
                row[f"acc_{k}"] = acc.mean().item()
                if k == "random":
                    row["acc_random_per_seed"] = acc.tolist()
            rows.append(row)
    base = {r["scale"]: r["w_norm"] for r in rows if r["lambda"] == 0.0}
    for r in rows:
        r["w_norm_rel"] = r["w_norm"] / base[r["scale"]] if r["scale"] in base else None
    return rows


def plot(rows, path: str, main_scale: float, control_scale) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    colors = {"AdamW": "tab:blue", "Adam+L2": "tab:red"}
    lams = sorted({r["lambda"] for r in rows})
    nonzero = [v for v in lams if v > 0]
    for opt_name in ("AdamW", "Adam+L2"):
        for scale, style in ((main_scale, "-"), (control_scale, ":")):
            if scale is None:
                continue
            rs = sorted((r for r in rows if r["optimizer"] == opt_name and r["scale"] == scale),
                        key=lambda r: r["lambda"])
            if not rs:
                continue
            lab = f"{opt_name}, spurious scale {scale:g}"
            lam = [r["lambda"] for r in rs]
            c = colors[opt_name]
            axes[0].plot(lam, [r["spurious_share"] for r in rs], style, marker="o", color=c, label=lab)
            axes[1].plot(lam, [r["acc_random"] for r in rs], style, marker="o", color=c, label=lab)
            axes[2].plot(lam, [r["acc_flipped"] for r in rs], style, marker="o", color=c, label=lab)
            if scale == main_scale:
                axes[1].plot(lam, [r["acc_iid"] for r in rs], style, marker=".", color=c, alpha=0.35,
                             label=f"{opt_name}: iid test (for reference)")
            if all(r["w_norm_rel"] is not None for r in rs):
                axes[3].plot([r["w_norm_rel"] for r in rs], [r["spurious_share"] for r in rs], style,
                             marker="o", color=c, label=lab)
    titles = ["spurious share of the logit margin (train dist.)", "test accuracy, spurious feature random",
              "test accuracy, spurious feature flipped", "spurious share vs shrinkage (matched)"]
    for i, ax in enumerate(axes):
        ax.set_title(titles[i], fontsize=9)
        ax.grid(alpha=0.3)
        if i < 3:
            # symlog: log axis with a place for lambda = 0
            ax.set_xscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)
            ax.set_xlabel("weight decay lambda (same value for both optimizers)")
    axes[3].set_xlabel("|w| / |w at lambda = 0|  (1 = no shrinkage)")
    axes[3].invert_xaxis()
    axes[0].set_ylabel("share")
    axes[1].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.suptitle("logistic regression, 4 weak causal features + 1 spurious feature (90% agreement in "
                 "training), onepass.AdamW vs onepass.Adam(weight_decay=...)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = base_parser(__doc__, "seconds: 2 lambdas, 1 seed, 300 steps, no control")
    p.add_argument("--lambdas", default="0,0.01,0.1,0.3,1,3,10")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--scale", type=float, default=10.0, help="scale of the spurious feature")
    p.add_argument("--control-scale", type=float, default=1.0,
                   help="rerun with the spurious feature at this scale (<= 0: no control)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.lambdas, args.seeds, args.steps, args.control_scale = "0,1", 1, 300, 0.0
    torch.set_num_threads(args.threads)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    seeds = list(range(args.seeds))
    control = args.control_scale if args.control_scale > 0 else None

    t0 = time.perf_counter()
    rows = []
    for scale in [args.scale] + ([control] if control is not None else []):
        for opt_name in ("AdamW", "Adam+L2"):
            rows += train(opt_name, lambdas, scale, seeds, args.n_train, args.n_test, args.steps, args.lr)
    wall = time.perf_counter() - t0

    print(f"spurious feature: logistic regression, {N_CAUSAL} causal features + 1 spurious "
          f"({P_TRAIN:.0%} agreement in training), {args.n_train} training points, lr {args.lr}, "
          f"{args.steps} full-batch steps, mean of {len(seeds)} seed(s); {wall:.1f} s")
    print("accuracies: iid = spurious agrees 90% as in training; random = 50%; flipped = 10%")
    print(f"{'scale':>5} {'optimizer':>9} {'lambda':>6} {'w_spur':>7} {'w_spur*sc':>9} {'|w_caus|':>8} "
          f"{'|w|rel':>6} {'sp.share':>8} {'train':>6} {'iid':>6} {'random':>6} {'flipped':>7}")
    for r in rows:
        rel = "-" if r["w_norm_rel"] is None else f"{r['w_norm_rel']:.2f}"
        print(f"{r['scale']:>5g} {r['optimizer']:>9} {r['lambda']:>6g} {r['w_spur']:>7.4f} "
              f"{r['w_spur_x_scale']:>9.3f} {r['w_causal_norm']:>8.3f} {rel:>6} {r['spurious_share']:>8.3f} "
              f"{r['acc_train']:>6.3f} {r['acc_iid']:>6.3f} {r['acc_random']:>6.3f} {r['acc_flipped']:>7.3f}")

    # A plain-language summary computed from the numbers above (no claim is fixed in advance).
    print("per lambda at scale %g, Adam+L2 minus AdamW:" % args.scale)
    for lam in lambdas:
        a = next(r for r in rows if r["scale"] == args.scale and r["optimizer"] == "AdamW" and r["lambda"] == lam)
        c = next(r for r in rows if r["scale"] == args.scale and r["optimizer"] == "Adam+L2" and r["lambda"] == lam)
        print(f"  lambda {lam:g}: spurious share {c['spurious_share'] - a['spurious_share']:+.3f}, "
              f"acc(random) {c['acc_random'] - a['acc_random']:+.3f}, acc(flipped) "
              f"{c['acc_flipped'] - a['acc_flipped']:+.3f}, acc(iid) {c['acc_iid'] - a['acc_iid']:+.3f}")

    # The same lambda is not the same strength for the two optimizers, so compare them also at the
    # same shrinkage: AdamW's spurious share interpolated at each Adam+L2 run's |w|rel (only where
    # AdamW's sweep reaches that shrinkage).
    matched = []
    for scale in sorted({r["scale"] for r in rows}, reverse=True):
        aw = sorted(((r["w_norm_rel"], r["spurious_share"]) for r in rows
                     if r["scale"] == scale and r["optimizer"] == "AdamW"))
        for c in (r for r in rows if r["scale"] == scale and r["optimizer"] == "Adam+L2" and r["lambda"] > 0):
            x = c["w_norm_rel"]
            for (x0, y0), (x1, y1) in zip(aw, aw[1:]):
                if x0 <= x <= x1 and x1 > x0:
                    share_aw = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                    matched.append({"scale": scale, "w_norm_rel": x, "lambda_l2": c["lambda"],
                                    "share_adam_l2": c["spurious_share"], "share_adamw": share_aw})
                    break
    if not matched:
        print("at matched shrinkage: no Adam+L2 run within the shrinkage range of AdamW's sweep")
    else:
        print("at matched shrinkage (AdamW interpolated at Adam+L2's |w|rel; only within AdamW's range):")
        for m in matched:
            print(f"  scale {m['scale']:g}, |w|rel {m['w_norm_rel']:.2f} (Adam+L2 lambda {m['lambda_l2']:g}): "
                  f"spurious share Adam+L2 {m['share_adam_l2']:.3f}, AdamW {m['share_adamw']:.3f}")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "spurious_feature.png")
    if have_matplotlib():
        plot(rows, png, args.scale, control)
        print(f"plot: {png}")
    else:
        png = None
        print("plot: skipped (matplotlib is not installed)")
    print("RESULT " + json.dumps({"example": "spurious_feature", "png": png, "steps": args.steps,
                                   "seeds": len(seeds), "wall_s": round(wall, 2), "rows": rows,
                                   "matched": matched}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
