"""Are weights trained with AdamW easier to quantize than weights trained with Adam + L2?

    python examples/quantization_friendliness.py          # 11 training runs, ~1-2 min on 2 cores
    python examples/quantization_friendliness.py --tiny   # seconds (the CI smoke test)

Task: a synthetic 10-class problem, x ~ N(0, I_32), label = argmax of a fixed random teacher
(32 -> 64 tanh -> 10); 8000 training points, 4000 test points. Student: an MLP 32 -> 256 -> 256 ->
10 (ReLU), the same init for every run, minibatches of 128 in the same order for every run,
lr 1e-3, 2000 steps (32 epochs). Decay on the weight matrices only (biases: none, the usual
practice; they are not quantized either).
  * onepass.AdamW(weight_decay=lam): decoupled, every weight shrinks by lr * lam a step.
  * onepass.Adam(weight_decay=lam): L2, lam * w joins the gradient and is divided by sqrt(v).
The same lam is not the same strength for the two: L2's lam * w competes with the loss gradient
before normalization, so lam = 0.1 already collapses this model to chance under Adam + L2, while it
is a mild decay for AdamW (lr * lam = 1e-4 a step). Each optimizer therefore gets its own lam grid,
from weak to strong (AdamW 0, 0.01, 0.1, 1, 3; Adam + L2 0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), and
"comparable decay" means the same shrinkage: the per-layer bars compare AdamW at --main-lambda with
the Adam + L2 run whose total weight norm |W| is closest (log scale), and the other panels plot
against |W|. lam = 0 is plain Adam for both and must give the same weights bit for bit.

Quantization: each weight matrix to int8, per tensor, symmetric absmax scaling:
s = max|W| / 127, Q(W) = s * round(W / s). Reported per layer: the relative error
|W - Q(W)|_F / |W|_F and the ratio max|W| / rms(W) that drives it (rounding error is uniform in
+-s/2, so the relative error is ~ (max|W| / rms(W)) / (127 sqrt 12): a tensor with outliers has a
coarse grid for everything else); and the test accuracy before and after. int8 costs these
small MLPs almost no accuracy, so int4 (same scheme, 7 levels a side) is reported as well, where
the differences can show.

Prints a table and a final ``RESULT {json}`` line; writes ``quantization_friendliness.png``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import onepass
from _common import base_parser, have_matplotlib  # examples/_common.py (the script's folder)

IN_DIM, N_CLASSES = 32, 10


def make_data(n_train: int, n_test: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(IN_DIM, 64, generator=gen) / math.sqrt(IN_DIM)
    w2 = torch.randn(64, N_CLASSES, generator=gen) / math.sqrt(64)
    x = torch.randn(n_train + n_test, IN_DIM, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model(width: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, N_CLASSES))


def layers(model):
    return [m for m in model if isinstance(m, torch.nn.Linear)]


def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor absmax quantization to signed ``bits``-bit integers, dequantized."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().max() / qmax
    if scale == 0:
        return w.clone()
    return torch.round(w / scale).clamp(-qmax, qmax) * scale


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def quantized_accuracy(model, x, y, bits: int) -> float:
    saved = [lin.weight.clone() for lin in layers(model)]
    for lin in layers(model):
        lin.weight.copy_(quantize(lin.weight, bits))
    acc = accuracy(model, x, y)
    for lin, w in zip(layers(model), saved):
        lin.weight.copy_(w)
    return acc


def train_one(opt_name: str, lam: float, data, args):
    x_tr, y_tr, x_te, y_te = data
    model = make_model(args.width, args.seed)
    decay = [lin.weight for lin in layers(model)]
    no_decay = [lin.bias for lin in layers(model)]
    groups = [{"params": decay, "weight_decay": lam}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (onepass.AdamW if opt_name == "AdamW" else onepass.Adam)(groups, lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)     # same batch order for every run
    n = x_tr.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(args.steps):
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    row = {"optimizer": opt_name, "lambda": lam, "acc_train": accuracy(model, x_tr, y_tr),
           "acc": accuracy(model, x_te, y_te), "layers": [],
           "weight_norm": math.sqrt(sum(lin.weight.detach().pow(2).sum().item() for lin in layers(model)))}
    for bits in (8, 4):
        row[f"acc_int{bits}"] = quantized_accuracy(model, x_te, y_te, bits)
        row[f"drop_int{bits}"] = row["acc"] - row[f"acc_int{bits}"]
    with torch.no_grad():
        for i, lin in enumerate(layers(model)):
            w = lin.weight
            row["layers"].append({
                "name": f"fc{i + 1}", "shape": list(w.shape), "norm": w.norm().item(),
                "absmax_over_rms": (w.abs().max() / w.pow(2).mean().sqrt()).item(),
                "rel_err_int8": ((w - quantize(w, 8)).norm() / w.norm()).item(),
                "rel_err_int4": ((w - quantize(w, 4)).norm() / w.norm()).item(),
            })
    return row, [lin.weight.detach().clone() for lin in layers(model)]


def nearest_l2(rows, adamw_row):
    """The Adam+L2 run (lambda > 0) whose total weight norm is closest to adamw_row's (log scale)."""
    cands = [r for r in rows if r["optimizer"] == "Adam+L2" and r["lambda"] > 0]
    if not cands:
        return None
    return min(cands, key=lambda r: abs(math.log(r["weight_norm"] / adamw_row["weight_norm"])))


def plot(rows, path: str, main_lambda: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [ly["name"] for ly in rows[0]["layers"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    # (1) per-layer int8 error: no decay, AdamW at main_lambda, Adam+L2 at the nearest |W|
    pick = []
    zero = next((r for r in rows if r["lambda"] == 0.0), None)
    if zero is not None:
        pick.append((f"no decay (|W| {zero['weight_norm']:.1f})", zero, "tab:gray"))
    a = next((r for r in rows if r["optimizer"] == "AdamW" and r["lambda"] == main_lambda), None)
    c = nearest_l2(rows, a) if a is not None else None
    for lab, r, col in (("AdamW", a, "tab:blue"), ("Adam+L2", c, "tab:red")):
        if r is not None:
            pick.append((f"{lab}, lambda {r['lambda']:g} (|W| {r['weight_norm']:.1f})", r, col))
    width = 0.8 / max(len(pick), 1)
    for k, (lab, r, col) in enumerate(pick):
        axes[0].bar([i + (k - (len(pick) - 1) / 2) * width for i in range(len(names))],
                    [ly["rel_err_int8"] for ly in r["layers"]], width, label=lab, color=col)
    axes[0].set_xticks(range(len(names)))
    axes[0].set_xticklabels([f"{n} {tuple(ly['shape'])}" for n, ly in zip(names, rows[0]["layers"])], fontsize=8)
    axes[0].set_ylabel("|W - Q(W)| / |W|  (int8, per tensor)")
    axes[0].set_title("per-layer int8 error, AdamW vs Adam+L2 at about the same |W|", fontsize=9)
    axes[0].legend(fontsize=7)
    # (2), (3): against the total weight norm |W|, the common axis for the two lambda grids
    markers = ["o", "s", "^", "D", "v"]
    for opt_name, style, col in (("AdamW", "-", "tab:blue"), ("Adam+L2", "--", "tab:red")):
        rs = sorted((r for r in rows if r["optimizer"] == opt_name), key=lambda r: r["lambda"])
        xs = [r["weight_norm"] for r in rs]
        for i, n in enumerate(names):
            axes[1].plot(xs, [r["layers"][i]["rel_err_int8"] for r in rs], style,
                         marker=markers[i % len(markers)], color=col, label=f"{opt_name} {n}")
        axes[2].plot(xs, [r["drop_int8"] for r in rs], style, marker="o", color=col, label=f"{opt_name}, int8")
        axes[2].plot(xs, [r["drop_int4"] for r in rs], style, marker="x", color=col, alpha=0.6,
                     label=f"{opt_name}, int4")
        for r in rs:
            axes[2].annotate(f"{r['lambda']:g}", (r["weight_norm"], r["drop_int4"]), fontsize=6, color=col,
                             textcoords="offset points", xytext=(3, 3))
    for ax in axes[1:]:
        ax.set_xscale("log")
        ax.set_xlabel("total weight norm |W| (smaller = stronger decay)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[1].set_ylabel("relative int8 error")
    axes[1].set_title("per-layer int8 error (solid AdamW, dashed Adam+L2)", fontsize=9)
    axes[1].legend(fontsize=6, ncol=2)
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set_ylabel("test accuracy lost to quantization")
    axes[2].set_title("test accuracy lost to quantization (labels: lambda)", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.suptitle("MLP 32-256-256-10 on a synthetic teacher task: per-tensor absmax quantization of "
                 "onepass.AdamW vs onepass.Adam(weight_decay) weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = base_parser(__doc__, "seconds: 2 lambdas each, 150 steps, width 64")
    p.add_argument("--lambdas-adamw", default="0,0.01,0.1,1,3", help="onepass.AdamW weight decays")
    p.add_argument("--lambdas-l2", default="0,1e-4,3e-4,1e-3,3e-3,1e-2", help="onepass.Adam (L2) weight decays")
    p.add_argument("--main-lambda", type=float, default=1.0,
                   help="the AdamW lambda of the per-layer bar plot (Adam+L2: the run with the nearest |W|)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.tiny:
        args.lambdas_adamw, args.lambdas_l2, args.main_lambda = "0,1", "0,1e-3", 1.0
        args.steps, args.width, args.n_train, args.n_test = 150, 64, 2000, 1000
    torch.set_num_threads(args.threads)
    grids = {"AdamW": [float(v) for v in args.lambdas_adamw.split(",")],
             "Adam+L2": [float(v) for v in args.lambdas_l2.split(",")]}

    t0 = time.perf_counter()
    data = make_data(args.n_train, args.n_test, args.seed)
    rows, weights = [], {}
    for opt_name in ("AdamW", "Adam+L2"):
        for lam in grids[opt_name]:
            row, ws = train_one(opt_name, lam, data, args)
            rows.append(row)
            weights[(opt_name, lam)] = ws
    wall = time.perf_counter() - t0
    # lambda = 0: AdamW and Adam are the same optimizer, so the same bits (a check on the setup)
    same_at_zero = None
    if 0.0 in grids["AdamW"] and 0.0 in grids["Adam+L2"]:
        same_at_zero = all(torch.equal(a, b) for a, b in zip(weights[("AdamW", 0.0)], weights[("Adam+L2", 0.0)]))

    names = [ly["name"] for ly in rows[0]["layers"]]
    print(f"quantization: MLP {IN_DIM}-{args.width}-{args.width}-{N_CLASSES}, {args.n_train} training points, "
          f"lr {args.lr}, batch {args.batch}, {args.steps} steps; int8/int4 per tensor, symmetric absmax; "
          f"{wall:.1f} s")
    head = " ".join(f"{n + ' err8':>9} {n + ' mx/rms':>11}" for n in names)
    print(f"{'optimizer':>9} {'lambda':>6} {'|W|':>6} {'train':>6} {'test':>6} {'int8':>6} {'drop8':>7} "
          f"{'int4':>6} {'drop4':>7}  {head}")
    for r in rows:
        wn = r["weight_norm"]
        per = " ".join(f"{ly['rel_err_int8']:>9.5f} {ly['absmax_over_rms']:>11.2f}" for ly in r["layers"])
        print(f"{r['optimizer']:>9} {r['lambda']:>6g} {wn:>6.2f} {r['acc_train']:>6.3f} {r['acc']:>6.3f} "
              f"{r['acc_int8']:>6.3f} {r['drop_int8']:>+7.3f} {r['acc_int4']:>6.3f} {r['drop_int4']:>+7.3f}  {per}")
    if same_at_zero is not None:
        print(f"lambda 0: AdamW and Adam+L2 weights identical bit for bit: {same_at_zero}")
    # A summary computed from the numbers (no claim fixed in advance): at matched shrinkage (each
    # AdamW run with lambda > 0 against the Adam+L2 run of nearest |W|), which optimizer's weights
    # quantize with the smaller int8 error, layer by layer.
    pairs = []
    for a in (r for r in rows if r["optimizer"] == "AdamW" and r["lambda"] > 0):
        c = nearest_l2(rows, a)
        if c is None:
            continue
        ratios = {la["name"]: lc["rel_err_int8"] / la["rel_err_int8"] for la, lc in zip(a["layers"], c["layers"])}
        pairs.append({"adamw_lambda": a["lambda"], "l2_lambda": c["lambda"], "adamw_norm": a["weight_norm"],
                      "l2_norm": c["weight_norm"], "err8_ratio_l2_over_adamw": ratios,
                      "acc_adamw": a["acc"], "acc_l2": c["acc"]})
        print(f"  matched |W|: AdamW lambda {a['lambda']:g} (|W| {a['weight_norm']:.2f}, test {a['acc']:.3f}) vs "
              f"Adam+L2 lambda {c['lambda']:g} (|W| {c['weight_norm']:.2f}, test {c['acc']:.3f}): "
              f"int8 error Adam+L2 / AdamW: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "quantization_friendliness.png")
    if have_matplotlib():
        plot(rows, png, args.main_lambda)
        print(f"plot: {png}")
    else:
        png = None
        print("plot: skipped (matplotlib is not installed)")
    print("RESULT " + json.dumps({"example": "quantization_friendliness", "png": png, "steps": args.steps,
                                   "wall_s": round(wall, 2), "same_at_lambda0": same_at_zero, "rows": rows,
                                   "matched": pairs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
