"""The measured comparison behind onepass.quant's choice of 8-bit maps for int8 optimizer state.

    python bench/quant_maps.py [--steps 800] [--size small] [--out bench/results/quant_maps]

Trains bench/char_lm.py's character model with int8 state under each candidate pair of maps
(signed map for m, unsigned map for v; quant.MAPS), same init, same batches, and compares the final
validation loss with fp32 state. Runs on the reference backend, which takes the maps from
quant.SIGNED_MAP / UNSIGNED_MAP at each step (the kernels get the same packed tables).
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
CANDIDATES = [("dynamic", "dynamic"), ("linear", "linear"), ("power2", "power2"),
              ("power3", "power3"), ("power4", "power4"), ("power2", "power4"),
              ("dynamic", "power4")]


def _char_lm():
    spec = importlib.util.spec_from_file_location("char_lm", os.path.join(HERE, "char_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["char_lm"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--size", default="small")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_maps"))
    args = ap.parse_args(argv)
    lm = _char_lm()
    saved = (quant.SIGNED_MAP, quant.UNSIGNED_MAP)
    rows = []
    t0 = time.time()
    base = lm.train({"backend": "reference"}, args.steps, size=args.size)
    rows.append({"maps": "fp32 state", "final_eval_loss": base["final_eval_loss"], "nonfinite_steps": 0})
    print(f"fp32 state: {base['final_eval_loss']:.4f}", flush=True)
    try:
        for sm, um in CANDIDATES:
            quant.SIGNED_MAP, quant.UNSIGNED_MAP = sm, um
            r = lm.train({"backend": "reference", "state_dtype": "int8"}, args.steps, size=args.size)
            rows.append({"maps": f"{sm}/{um}", "final_eval_loss": r["final_eval_loss"],
                         "nonfinite_steps": r["nonfinite_steps"]})
            print(f"{sm}/{um}: {r['final_eval_loss']:.4f} ({r['final_eval_loss'] / base['final_eval_loss']:.4f} of fp32)"
                  f" nonfinite {r['nonfinite_steps']}", flush=True)
    finally:
        quant.SIGNED_MAP, quant.UNSIGNED_MAP = saved
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_maps.json"), "w") as f:
        json.dump({"steps": args.steps, "size": args.size, "torch": torch.__version__,
                   "seconds": time.time() - t0, "results": rows}, f, indent=1)
    print(f"{'maps (m / v)':<22} {'final eval loss':>15} {'x fp32':>8}")
    for r in rows:
        print(f"{r['maps']:<22} {r['final_eval_loss']:>15.4f} {r['final_eval_loss'] / base['final_eval_loss']:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
