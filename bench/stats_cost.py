"""What the fused statistics cost: onepass.AdamW with and without ``statistics=True``, steps
alternated round by round on two copies of the same case, so a machine that slows down mid-run
slows both alike (``python -m onepass`` times its contestants one after another, and on this
2-core machine a busy neighbour moved that ratio by several percent between runs).

    python bench/stats_cost.py                          # gpt2 and small, 30 rounds
    python bench/stats_cost.py --cases gpt2 --rounds 50 --json out.json

Prints, per case, the median of the per-round ratios (with / without) and each side's median
step. Cases come from onepass.benchmark.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import onepass
from onepass import benchmark


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: str, device: torch.device, rounds: int, warmup: int = 2) -> dict:
    shapes = benchmark.case_shapes(case, device)
    opts = {}
    for stats in (False, True):
        params = benchmark.make_params(shapes, device)
        opts[stats] = onepass.AdamW(params, lr=1e-3, weight_decay=0.01, statistics=stats)
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    times = {False: [], True: []}
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)  # neither always goes first
        for stats in order:
            sync(device)
            t0 = time.perf_counter()
            opts[stats].step()
            sync(device)
            times[stats].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(times[False], times[True])]
    return {
        "case": case,
        "params": benchmark.count_params(shapes),
        "rounds": rounds,
        "ms_without": statistics.median(times[False]) * 1e3,
        "ms_with": statistics.median(times[True]) * 1e3,
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="gpt2,small")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the results (and the machine) as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = [measure(c, device, args.rounds) for c in args.cases.split(",")]
    for r in results:
        print(f"{r['case']:6s} without {r['ms_without']:8.2f} ms  with {r['ms_with']:8.2f} ms  "
              f"median ratio {r['median_ratio']:.3f} ({(r['median_ratio'] - 1) * 100:+.1f}%)")
    if args.json:
        machine = benchmark.machine_info(device)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__,
                       "onepass": getattr(onepass, "__version__", None), "results": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
