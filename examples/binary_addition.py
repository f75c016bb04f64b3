"""Weight-decay sweep on binary addition: train on 2- and 4-digit sums, test on 3-digit sums.

    python examples/binary_addition.py                 # 7 lambdas x 3 seeds, ~1-2 min on 2 cores
    python examples/binary_addition.py --tiny          # seconds (the CI smoke test)

Task. Operands a, b are 4-bit numbers (0..15), fed to the net as 8 bits (+1/-1, least significant
first); the net outputs the 5 bits of a + b (one logit a bit, binary cross-entropy). An "n-digit
sum" is one whose longer operand has exactly n binary digits. Training set: every 2-digit sum
(12 pairs) and every 4-digit sum (192 pairs); test set: every 3-digit sum (48 pairs), a length the
net never saw: both operands then have bit 3 = 0 and at least one has bit 2 = 1, a combination
absent from training, so the test asks whether the net learned per-bit addition (with carries)
rather than a lookup table of the training pairs. All 256 pairs split as 204 / 48 / 4 (the four
1-digit sums are in neither set). The table also splits the test set: 20 sums below 8 and 28 that
carry into bit 3 (a + b >= 8). For those 28 the sum's bit 3 is the carry out of bit 2 with both
bit-3 inputs 0, which no training pair shows (a training pair with both bit-3 inputs 0 is a 2-digit
sum, at most 6), and an MLP shares no weights between bit positions: expect them to fail, so the
test accuracy of a net that does everything else right is 20/48 = 0.417.

Model and training. A residual MLP (8 -> 64, two blocks h = h + W2 relu(W1 h), -> 5), full batch,
onepass.AdamW (decoupled decay) at lr 1e-3 for 3000 steps. Weight decay on the weight matrices
only, not the biases (the usual practice: a bias shift is not complexity). The same init and data
for every lambda; lambda = 0 is plain Adam.

Several nets (one per lambda and seed) are trained in lockstep as one stacked model: every weight
is a [nets, ...] tensor and the forward pass uses batched matmuls. Adam's update is elementwise and
the loss is the sum of the nets' losses, so each net gets exactly its own gradient and its own
update: stacking changes nothing about any one net's training, it only removes per-op overhead
(one small net a step is ~2-3 ms of Python and dispatch; 21 of them stacked cost about as much).

Prints a table (lambda, train / test exact-match accuracy averaged over seeds, test per-bit
accuracy) and a final ``RESULT {json}`` line; writes ``binary_addition.png``.
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

OPERAND_BITS = 4
SUM_BITS = OPERAND_BITS + 1


def bits(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n low bits of each integer in x, least significant first, as floats 0/1."""
    return torch.stack([(x >> i) & 1 for i in range(n)], dim=-1).float()


def n_digits(x: torch.Tensor) -> torch.Tensor:
    """Number of binary digits of each integer (0 has 0 digits)."""
    out = torch.zeros_like(x)
    for i in range(OPERAND_BITS):
        out = torch.where(x >= (1 << i), torch.full_like(x, i + 1), out)
    return out


def make_data():
    a, b = torch.meshgrid(torch.arange(1 << OPERAND_BITS), torch.arange(1 << OPERAND_BITS), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.cat([bits(a, OPERAND_BITS), bits(b, OPERAND_BITS)], dim=1) * 2 - 1
    y = bits(a + b, SUM_BITS)
    length = torch.maximum(n_digits(a), n_digits(b))
    train = (length == 2) | (length == 4)
    test = length == 3
    # Test sums that reach bit 3 (a + b >= 8): there both operands have bit 3 = 0 and the sum's
    # bit 3 is the carry out of bit 2, which no training pair shows (a training pair with both
    # bit-3 inputs 0 is a 2-digit sum, at most 3 + 3 = 6). An MLP shares nothing between bit
    # positions, so these are the pairs it has no evidence for; the others (a + b < 8) are not.
    carry3 = (a + b) >= (1 << (OPERAND_BITS - 1))
    return x[train], y[train], x[test], y[test], carry3[test]


class StackedResMLP(torch.nn.Module):
    """``nets`` independent residual MLPs evaluated together (weights [nets, in, out], bmm)."""

    def __init__(self, nets: int, seeds, width: int, blocks: int):
        super().__init__()
        shapes = [(2 * OPERAND_BITS, width)] + [(width, width)] * (2 * blocks) + [(width, SUM_BITS)]
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for fan_in, fan_out in shapes:
            self.weights.append(torch.nn.Parameter(torch.empty(nets, fan_in, fan_out)))
            self.biases.append(torch.nn.Parameter(torch.empty(nets, 1, fan_out)))
        # torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias,
        # drawn per net from that net's seed: a net's init does not depend on the rest of the sweep.
        for k, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            for w, bias in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(w.shape[1])
                with torch.no_grad():
                    w[k].uniform_(-bound, bound, generator=gen)
                    bias[k].uniform_(-bound, bound, generator=gen)
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, in] shared by all nets -> logits [nets, batch, SUM_BITS]
        W, B = self.weights, self.biases
        h = torch.baddbmm(B[0], x.expand(W[0].shape[0], -1, -1), W[0])
        for i in range(self.blocks):
            w1, b1, w2, b2 = W[1 + 2 * i], B[1 + 2 * i], W[2 + 2 * i], B[2 + 2 * i]
            h = h + torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, h, w1)), w2)
        return torch.baddbmm(B[-1], torch.relu(h), W[-1])


def sweep(lambdas, seeds, steps: int, lr: float, width: int, blocks: int):
    x_tr, y_tr, x_te, y_te, carry3 = make_data()
    # One stacked model per lambda (its own param group), each holding one net per seed.
    models = [StackedResMLP(len(seeds), seeds, width, blocks) for _ in lambdas]
    groups = []
    for lam, m in zip(lambdas, models):
        groups.append({"params": list(m.weights), "weight_decay": lam})
        groups.append({"params": list(m.biases), "weight_decay": 0.0})
    opt = onepass.AdamW(groups, lr=lr)
    for _ in range(steps):
        loss = sum(F.binary_cross_entropy_with_logits(m(x_tr), y_tr.expand(len(seeds), -1, -1),
                                                      reduction="none").mean((1, 2)).sum()
                   for m in models)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows = []
    with torch.no_grad():
        for lam, m in zip(lambdas, models):
            pred_tr, pred_te = m(x_tr) > 0, m(x_te) > 0
            exact_tr = (pred_tr == y_tr.bool()).all(-1).float().mean(-1)   # [seeds]
            ok_te = (pred_te == y_te.bool()).all(-1).float()                  # [seeds, test]
            exact_te = ok_te.mean(-1)
            bit_te = (pred_te == y_te.bool()).float().mean((-1, -2))
            wnorm = torch.sqrt(sum((w ** 2).sum((1, 2)) for w in m.weights))
            rows.append({
                "lambda": lam,
                "train_acc": exact_tr.mean().item(),
                "test_acc": exact_te.mean().item(),
                "test_acc_per_seed": exact_te.tolist(),
                "test_bit_acc": bit_te.mean().item(),
                "test_acc_sum_lt8": ok_te[:, ~carry3].mean().item(),
                "test_acc_sum_ge8": ok_te[:, carry3].mean().item(),
                "weight_norm": wnorm.mean().item(),
            })
    return rows, int(x_tr.shape[0]), int(x_te.shape[0]), int(carry3.sum())


def plot(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [r["lambda"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lam, [r["train_acc"] for r in rows], "o-", label="train (2- and 4-digit), exact")
    ax.plot(lam, [r["test_acc"] for r in rows], "s-", label="test (3-digit), exact")
    ax.plot(lam, [r["test_bit_acc"] for r in rows], "^--", alpha=0.6, label="test, per bit")
    ax.plot(lam, [r["test_acc_sum_lt8"] for r in rows], ":", color="tab:green", label="test exact, a+b < 8")
    ax.plot(lam, [r["test_acc_sum_ge8"] for r in rows], ":", color="tab:red", label="test exact, a+b >= 8 (carry into bit 3)")
    for r in rows:
        ax.scatter([r["lambda"]] * len(r["test_acc_per_seed"]), r["test_acc_per_seed"], s=10,
                   color="tab:orange", alpha=0.4)
    nonzero = [v for v in lam if v > 0]
    # symlog: a log axis that still has a place for lambda = 0 (linear below the smallest lambda)
    ax.set_xscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)
    ax.set_xlabel("weight decay lambda (onepass.AdamW, decoupled)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = base_parser(__doc__, "a few seconds: 2 lambdas, 1 seed, 200 steps")
    p.add_argument("--lambdas", default="0,0.01,0.1,0.3,1,3,10", help="comma-separated weight decays")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: these ops are too small to split, and 1 is deterministic)")
    args = p.parse_args(argv)
    if args.tiny:
        args.lambdas, args.seeds, args.steps = "0,1", 1, 200
    torch.set_num_threads(args.threads)
    lambdas = [float(v) for v in args.lambdas.split(",")]
    seeds = list(range(args.seeds))

    t0 = time.perf_counter()
    rows, n_train, n_test, n_carry3 = sweep(lambdas, seeds, args.steps, args.lr, args.width, args.blocks)
    wall = time.perf_counter() - t0

    print(f"binary addition: {n_train} training sums (2- and 4-digit), {n_test} test sums (3-digit); "
          f"residual MLP width {args.width}, {args.blocks} blocks; onepass.AdamW lr {args.lr}, "
          f"{args.steps} full-batch steps; {len(seeds)} seed(s); {wall:.1f} s")
    print(f"test columns: exact = all 5 sum bits right; a+b<8 / a+b>=8 = exact on the {n_test - n_carry3} "
          f"test sums below 8 and the {n_carry3} that carry into bit 3 (never seen with both bit-3 "
          f"inputs 0); |W| = norm of all weight matrices")
    print(f"{'lambda':>8} {'train exact':>12} {'test exact':>11} {'a+b<8':>7} {'a+b>=8':>7} {'test per-bit':>13} "
          f"{'|W|':>7}  test exact per seed")
    for r in rows:
        per_seed = " ".join(f"{v:.3f}" for v in r["test_acc_per_seed"])
        print(f"{r['lambda']:>8g} {r['train_acc']:>12.3f} {r['test_acc']:>11.3f} {r['test_acc_sum_lt8']:>7.3f} "
              f"{r['test_acc_sum_ge8']:>7.3f} {r['test_bit_acc']:>13.3f} {r['weight_norm']:>7.2f}  {per_seed}")

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "binary_addition.png")
    if have_matplotlib():
        plot(rows, png, f"binary addition: train 2+4-digit sums, test 3-digit ({len(seeds)} seeds, "
                        f"{args.steps} steps)")
        print(f"plot: {png}")
    else:
        png = None
        print("plot: skipped (matplotlib is not installed)")
    print("RESULT " + json.dumps({"example": "binary_addition", "png": png, "n_train": n_train,
                                   "n_test": n_test, "n_test_carry3": n_carry3, "steps": args.steps,
                                   "seeds": len(seeds),
                                   "wall_s": round(wall, 2), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
