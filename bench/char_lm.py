"""A small real training task for comparing onepass.AdamW's optimizer-state formats on accuracy.

    python bench/char_lm.py                                  # every config, 2000 steps, "small"
    python bench/char_lm.py --steps 300 --configs fp32,int8-state --out /tmp/charlm

A GPT-style character language model in plain torch (bench/char_task.py) learns
``bench/data/corpus.txt`` (465 KB of CPython standard-library docstrings, 96 distinct characters;
see make_corpus.py). Every config starts from the same initial weights and sees the same batches in
the same order, so the only difference between two runs is the optimizer's options and the param
dtype; the figure to compare is the final loss on the held-out 10% of the text
(``final_eval_loss``), evaluated on fixed windows.

Model: token + learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal multi-head
self-attention through ``F.scaled_dot_product_attention``, then a 4x GELU MLP), a final LayerNorm
and an untied linear head. Untied so that the head is a plain Linear that takes weight decay like
every other matrix, while the embedding (no decay) is only ever an input table; tying would make
one tensor both, and its decay a choice. No dropout: runs must be reproducible bit for bit.

Sizes (``SIZES``):
    tiny   d=16, 1 layer, 2 heads, ctx 16, batch 8     6,736 params   ~2.3 ms/step   (tests)
    small  d=112, 2 layers, 4 heads, ctx 64, batch 8  332,960 params  ~25 ms/step    (default)
measured (median step, evaluation excluded) on 2 cores of an AMD EPYC (Zen 3, AVX2),
torch 2.13 CPU on 2 threads, onepass's cpu backend, machine otherwise idle: fp32 params 23-25 ms,
bf16 params 31 ms. 10,000 "small" steps take ~4.5 minutes per fp32 config. Another process busy
on the same cores makes every step several times slower (each 2-thread op waits for the thread
that lost its core), so compare ms/step only between runs on a quiet machine.

"small" trains 8 windows a step, not 32: a step costs ~6 x params x tokens flops, and at 32 x 64
tokens even d=64 (117K params) took 45 ms, d=128 (430K) 122 ms, against a ~64 GFLOP/s peak for
these two cores. Keeping the model at 0.3M params and the step under 30 ms left the batch to give.
After 2000 steps (1M characters, 2.4 passes over the training text) fp32 reaches a validation
loss of 1.89 nats/char from 4.57 at init; it sits near 2.7-2.8 (what character bigrams give)
from step ~100 to ~500 before attention starts to pay.

Run ``python bench/char_lm.py --help`` for the command line; ``train()`` is the importable API.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import onepass
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # (char_task.py beside this file; the tests load this one by path)
from char_task import (SIZES, CharGPT, build_vocab, encode, fixed_batches,  # noqa: E402
                       load_corpus, random_batch, split)

# name -> (extra keyword arguments for onepass.AdamW, param dtype). The kwargs are passed through
# as they are: an option this onepass does not know yet makes the config "unsupported", it is
# never translated into something else.
CONFIGS = {
    "fp32": ({}, torch.float32),
    "bf16-state": ({"state_dtype": "bf16"}, torch.float32),
    "int8-state": ({"state_dtype": "int8"}, torch.float32),
    "bf16-params-nearest": ({"param_rounding": "nearest"}, torch.bfloat16),
    "bf16-params-stochastic": ({"param_rounding": "stochastic"}, torch.bfloat16),
    "bf16-params-kahan": ({"param_rounding": "kahan"}, torch.bfloat16),
}


WEIGHT_DECAY = 0.1


class UnsupportedConfig(Exception):
    """The installed onepass.AdamW does not accept one of the config's keyword arguments."""


def param_groups(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """Two groups: the weight matrices of Linear layers decay; biases, LayerNorm weights and
    embeddings do not (decaying a gain or a bias toward 0 only fights the normalisation)."""
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors, leaving out 0-dim ones (the per-param step counter)."""
    return sum(
        v.numel() * v.element_size()
        for st in optimizer.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup: int):
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then cosine decay to lr/10 at
    ``steps``. Built from torch's schedulers so the loop only calls ``step()``."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    decay_steps = max(1, steps - warmup)
    lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=lr / 10)
    if warmup <= 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Cross-entropy in fp32 whatever the model's dtype: a bf16 log-softmax over 96 classes would
    # round the loss itself to 2-3 significant digits (an 8-bit significand) and blur the
    # comparison it is there for.
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    was_training = model.training
    model.eval()
    total = sum(_loss(model, x, y).item() for x, y in batches)
    model.train(was_training)
    return total / len(batches)


def _all_finite(params) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


# --- training --------------------------------------------------------------------------------------

def train(
    opt_kwargs: dict,
    steps: int,
    *,
    size: str = "small",
    seed: int = 0,
    param_dtype: torch.dtype = torch.float32,
    lr: float = 3e-3,
    warmup: int | None = None,
    eval_every: int | None = None,
    eval_batches: int = 32,
    device: str = "cpu",
    corpus: str | None = None,
) -> dict:
    """Train a fresh model for ``steps`` steps with ``onepass.AdamW(..., **opt_kwargs)``.

    ``warmup`` defaults to steps // 10 capped at 200; ``eval_every`` to steps // 20 (the model is
    also evaluated before the first step and after the last). Raises UnsupportedConfig when
    onepass.AdamW rejects a keyword of ``opt_kwargs`` as unknown.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    cfg = SIZES[size]
    if warmup is None:
        warmup = min(200, steps // 10)
    if eval_every is None:
        eval_every = max(1, steps // 20)
    text = load_corpus(corpus)
    vocab = build_vocab(text)
    # Batches are cut on the CPU (the CPU generator below draws the offsets) and then moved.
    train_data, val_data = split(encode(text, vocab))
    val_batches = [(x.to(device), y.to(device))
                   for x, y in fixed_batches(val_data, cfg.ctx, cfg.batch, eval_batches)]

    torch.manual_seed(seed)
    model = CharGPT(len(vocab), cfg)
    # bf16 params are the model itself in bf16 (no fp32 master copy anywhere): what the optimizer's
    # rounding of the update does is all that keeps small updates from vanishing.
    model = model.to(device=device, dtype=param_dtype)
    params = list(model.parameters())
    try:
        optimizer = onepass.AdamW(param_groups(model), lr=lr, betas=(0.9, 0.99), **opt_kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UnsupportedConfig(f"unsupported by this onepass: {e}") from e
        raise
    scheduler = make_scheduler(optimizer, steps, warmup)
    # Batch order comes from its own generator, so evaluation (or anything else drawing from the
    # global RNG) cannot shift it: every config sees the same batches.
    gen = torch.Generator().manual_seed(seed)

    train_losses: list[float] = []
    eval_steps: list[int] = [0]
    eval_losses: list[float] = [evaluate(model, val_batches)]
    step_seconds: list[float] = []
    nonfinite = 0
    for step in range(1, steps + 1):
        x, y = random_batch(train_data, cfg.ctx, cfg.batch, gen)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        loss = _loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()  # also waits for the device, so the time below is the step's
        step_seconds.append(time.perf_counter() - t0)
        train_losses.append(loss_value)
        if not (math.isfinite(loss_value) and _all_finite(params)):
            nonfinite += 1
        if step % eval_every == 0 or step == steps:
            eval_steps.append(step)
            eval_losses.append(evaluate(model, val_batches))

    n_params = sum(p.numel() for p in params)
    sb = state_bytes(optimizer)
    return {
        "train_losses": train_losses,
        "eval_steps": eval_steps,
        "eval_losses": eval_losses,
        "final_eval_loss": eval_losses[-1],
        "nonfinite_steps": nonfinite,
        # The median step: robust to the first steps (allocations, state creation) and to other
        # load on a shared machine. The mean is kept too.
        "ms_per_step": 1e3 * statistics.median(step_seconds),
        "ms_per_step_mean": 1e3 * statistics.fmean(step_seconds),
        "state_bytes": sb,
        "state_bytes_per_param": sb / n_params,
        "n_params": n_params,
        "size": size,
        "seed": seed,
        "steps": steps,
        "param_dtype": str(param_dtype).replace("torch.", ""),
        "opt_kwargs": dict(opt_kwargs),
        "lr": lr,
        "warmup": warmup,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
    }


# --- command line ----------------------------------------------------------------------------------

def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10, check=True)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10, check=True)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _plot(results: dict, path: str, title: str) -> str | None:
    """Validation-loss curves to ``path``; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        if "eval_losses" in r:
            ax.plot(r["eval_steps"], r["eval_losses"], label=name, marker=".", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _table(results: dict) -> str:
    base = results.get("fp32", {}).get("final_eval_loss")
    head = (f"{'config':<24} {'final eval':>10} {'/ fp32':>8} {'state B/param':>13} "
            f"{'ms/step':>8} {'non-finite':>10}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "final_eval_loss" not in r:
            lines.append(f"{name:<24} {r.get('status', 'failed')}")
            continue
        loss = r["final_eval_loss"]
        ratio = f"{loss / base:8.4f}" if base and math.isfinite(base) else f"{'-':>8}"
        lines.append(
            f"{name:<24} {loss:10.4f} {ratio} {r['state_bytes_per_param']:13.2f} "
            f"{r['ms_per_step']:8.2f} {r['nonfinite_steps']:10d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, from: {', '.join(CONFIGS)} (default: all)")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="char_lm_results", help="folder for char_lm.json and char_lm.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    os.makedirs(args.out, exist_ok=True)

    results: dict[str, dict] = {}
    for name in names:
        kwargs, dtype = CONFIGS[name]
        print(f"{name}: {args.steps} steps, size {args.size}, params {str(dtype).replace('torch.', '')}, "
              f"AdamW kwargs {kwargs}", flush=True)
        t0 = time.perf_counter()
        try:
            r = train(kwargs, args.steps, size=args.size, seed=args.seed, param_dtype=dtype, lr=args.lr)
        except UnsupportedConfig as e:
            results[name] = {"status": "unsupported by this onepass", "error": str(e),
                             "opt_kwargs": kwargs}
            print(f"  unsupported by this onepass ({e.__cause__})", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - one broken config must not lose the others' results
            results[name] = {"status": f"failed: {type(e).__name__}", "error": str(e), "opt_kwargs": kwargs}
            print(f"  failed: {type(e).__name__}: {e}", flush=True)
            continue
        r["status"] = "ok"
        r["wall_seconds"] = time.perf_counter() - t0
        results[name] = r
        print(f"  final eval loss {r['final_eval_loss']:.4f}, {r['ms_per_step']:.1f} ms/step, "
              f"{r['wall_seconds']:.0f} s", flush=True)

    print()
    print(_table(results))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "onepass": onepass.__version__,
        "onepass_commit": _git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "steps": args.steps,
        "size": args.size,
        "seed": args.seed,
        "lr": args.lr,
        "corpus_chars": len(load_corpus()),
    }
    json_path = os.path.join(args.out, "char_lm.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        note = _plot(results, os.path.join(args.out, "char_lm.png"),
                     f"char LM ({args.size}, {args.steps} steps, seed {args.seed})")
        print(note or f"wrote {os.path.join(args.out, 'char_lm.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
