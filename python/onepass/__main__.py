"""``python -m onepass``: benchmark onepass.AdamW against torch and peers on the device present.

For every contestant: ms per step (interleaved rounds, ratio to torch fused), measured optimizer
state bytes per param, and the drift of its update from torch.optim.AdamW with fp32 state. Runs on
whatever is importable: if ``onepass.AdamW`` (or a peer) cannot be imported or cannot take a step,
that contestant is listed as skipped with the reason, so the command works on machines without
the optional peers (``pip install -e '.[bench]'`` installs those that run on the platform). See
``onepass.benchmark`` for what is measured.

Exit status: 0 on success; 1 if an onepass contestant was available but failed during the run
(so that scripts such as scripts/gpu_check.sh notice); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _count(s: str) -> int:
    """Accept 50000000, 5e7 or 50M."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:].lower(), 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def build_parser() -> argparse.ArgumentParser:
    from onepass import benchmark as b

    p = argparse.ArgumentParser(
        prog="python -m onepass",
        description="Benchmark one AdamW step: onepass vs torch fused/foreach/forloop and its peers "
                    "(optimi, bitsandbytes 32/8-bit, torchao 8/4-bit/fp8): speed with a bandwidth "
                    "ceiling measured in the same run, state bytes per param, and accuracy against "
                    "torch.optim.AdamW with fp32 state.")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if torch.cuda.is_available() else cpu")
    p.add_argument("--cases", type=_csv, default=list(b.DEFAULT_CASES),
                   help=f"comma-separated, from {','.join(b.CASES)} (default: {','.join(b.DEFAULT_CASES)})")
    p.add_argument("--contestants", type=_csv, default=None,
                   help=f"comma-separated (default: {','.join(b.DEFAULT_CONTESTANTS)}); "
                        f"also: {','.join(n for n in b.CONTESTANTS if n not in b.DEFAULT_CONTESTANTS)}")
    p.add_argument("--exclude", type=_csv, default=[], help="contestants to leave out")
    p.add_argument("--slow-limit", type=_count, default=None, metavar="N",
                   help="skip slow contestants (torch-forloop, the 8/4-bit peers) on cases above N "
                        "params, e.g. 50M (default: none; the time budget gives them fewer rounds)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="param/grad dtype")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds, the most a contestant gets (default 10 on cpu, 50 on cuda, "
                        "3 with --quick)")
    p.add_argument("--budget", type=float, default=b.DEFAULT_BUDGET_S, metavar="SECONDS",
                   help="time per contestant and case: one whose steps would take longer than this "
                        f"over --rounds gets fewer rounds (default {b.DEFAULT_BUDGET_S:g}; 0: no "
                        "budget)")
    p.add_argument("--min-rounds", type=int, default=b.DEFAULT_MIN_ROUNDS,
                   help=f"fewest rounds the budget leaves a contestant (default {b.DEFAULT_MIN_ROUNDS})")
    p.add_argument("--accuracy-steps", type=int, default=b.ACCURACY_STEPS, metavar="N",
                   help=f"steps of the accuracy protocol (default {b.ACCURACY_STEPS}; 0: skip it)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per contestant (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: shrunken cases (gpt2 with 1 layer, width 128 and a "
                        "1024 vocab; 100 small tensors; huge 2**20) and 3 rounds")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' for stdout)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr (they show only on a terminal anyway)")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from onepass import benchmark as b

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        # Fail before the (possibly long) run, not after it.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed (pip install matplotlib)",
                  file=sys.stderr)
            return 2
    # torch warns once per tensor subclass without a stable cache hash (torchao's low-bit state)
    # when torch.compile caches it: nothing the reader can act on.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    try:
        result = b.run_benchmark(
            cases=args.cases, device=args.device, dtype=args.dtype, rounds=args.rounds,
            warmup=args.warmup, contestants=args.contestants, exclude=args.exclude,
            slow_limit=args.slow_limit, quick=args.quick,
            progress=False if args.no_progress else None, budget_s=args.budget or None,
            min_rounds=args.min_rounds, accuracy_steps=args.accuracy_steps)
    except (ValueError, RuntimeError) as e:  # unknown case/contestant/dtype, cuda missing
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.plot:
        b.plot(result, args.plot)
    # With --json - the table goes to stderr so stdout stays parseable.
    print(b.format_table(result), file=sys.stderr if args.json == "-" else sys.stdout)

    failed = [n for c in result["cases"] for n in c["errors"] if n.startswith("onepass")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
