"""The measured comparison behind onepass.quant's choice of 8-bit maps for int8 optimizer state.

    python bench/quant_maps.py [--steps 600] [--seeds 0,1,2] [--maps dynamic/dynamic,float3/float3]
                               [--size small] [--out bench/results/quant_maps]

Trains bench/char_lm.py's character model with int8 state under each candidate pair of maps
(signed map for m, unsigned map for v; quant.MAPS), and with fp32 state, for each seed (same init
and batches per seed across candidates), and compares the final validation loss with fp32
state's: per seed, and the mean ratio over seeds (one seed's differences are within noise).
Runs on the reference backend, which takes the maps from quant.SIGNED_MAP / UNSIGNED_MAP at each
step (the kernels get the same packed tables).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

from onepass import quant

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MAPS = "dynamic/dynamic,float3/float3,power4/power4"


def _char_lm():
    spec = importlib.util.spec_from_file_location("char_lm", os.path.join(HERE, "char_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["char_lm"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--maps", default=DEFAULT_MAPS, help="comma-separated signed/unsigned pairs")
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_maps"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    candidates = [tuple(pair.split("/")) for pair in args.maps.split(",")]
    for sm, um in candidates:
        if sm not in quant.MAPS or um not in quant.MAPS:
            ap.error(f"unknown map in {sm}/{um}: choose from {sorted(quant.MAPS)}")
    lm = _char_lm()
    saved = (quant.SIGNED_MAP, quant.UNSIGNED_MAP)
    rows = []
    t0 = time.time()
    try:
        for seed in seeds:
            base = lm.train({"backend": "reference"}, args.steps, size=args.size, seed=seed)
            rows.append({"maps": "fp32 state", "seed": seed, "final_eval_loss": base["final_eval_loss"],
                         "ratio": 1.0, "nonfinite_steps": 0})
            print(f"seed {seed} fp32 state: {base['final_eval_loss']:.4f}", flush=True)
            for sm, um in candidates:
                quant.SIGNED_MAP, quant.UNSIGNED_MAP = sm, um
                r = lm.train({"backend": "reference", "state_dtype": "int8"}, args.steps,
                             size=args.size, seed=seed)
                ratio = r["final_eval_loss"] / base["final_eval_loss"]
                rows.append({"maps": f"{sm}/{um}", "seed": seed, "final_eval_loss": r["final_eval_loss"],
                             "ratio": ratio, "nonfinite_steps": r["nonfinite_steps"]})
                print(f"seed {seed} {sm}/{um}: {r['final_eval_loss']:.4f} ({ratio:.4f} of fp32)"
                      f" nonfinite {r['nonfinite_steps']}", flush=True)
    finally:
        quant.SIGNED_MAP, quant.UNSIGNED_MAP = saved
    names = ["fp32 state"] + [f"{sm}/{um}" for sm, um in candidates]
    summary = []
    for name in names:
        rs = [r for r in rows if r["maps"] == name]
        summary.append({"maps": name, "mean_ratio": sum(r["ratio"] for r in rs) / len(rs),
                        "worst_ratio": max(r["ratio"] for r in rs),
                        "mean_final_eval_loss": sum(r["final_eval_loss"] for r in rs) / len(rs),
                        "nonfinite_steps": sum(r["nonfinite_steps"] for r in rs)})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_maps.json"), "w") as f:
        json.dump({"steps": args.steps, "size": args.size, "seeds": seeds, "torch": torch.__version__,
                   "seconds": time.time() - t0, "results": rows, "summary": summary}, f, indent=1)
    print(f"{'maps (m / v)':<22} {'mean loss':>10} {'mean x fp32':>12} {'worst x fp32':>13} {'nonfinite':>10}")
    for s in summary:
        print(f"{s['maps']:<22} {s['mean_final_eval_loss']:>10.4f} {s['mean_ratio']:>12.4f}"
              f" {s['worst_ratio']:>13.4f} {s['nonfinite_steps']:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
