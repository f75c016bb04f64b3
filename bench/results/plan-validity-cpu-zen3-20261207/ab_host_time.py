"""Before/after of bench/host_time.py in one run: processes of the two trees alternate
(before, after, before, after, ...), each running host_time.py --json; prints each row's median
over the processes of each tree and the after/before ratio.

    python ab_host_time.py BEFORE_PYTHON_DIR AFTER_PYTHON_DIR [--procs 4] [--rounds 20]

A tree's python dir is one holding an onepass package with its built _C module (the before
tree: `git archive` of the older commit's python/ and bench/, plus its _C .so).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
HOST_TIME = os.path.join(HERE, "..", "..", "host_time.py")

ap = argparse.ArgumentParser()
ap.add_argument("before")
ap.add_argument("after")
ap.add_argument("--procs", type=int, default=4)
ap.add_argument("--rounds", type=int, default=20)
args = ap.parse_args()

runs = {"before": [], "after": []}
for i in range(args.procs):
    for name in ("before", "after"):
        path = getattr(args, name)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            subprocess.run([sys.executable, HOST_TIME, "--rounds", str(args.rounds), "--json", f.name],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            runs[name].append(json.load(open(f.name)))
        print(f"process {i} {name} done", file=sys.stderr)


first = runs["before"][0]["median_us"]
print(f"{'row':44s} {'before us':>10s} {'after us':>10s} {'after/before':>13s}")
for n in first:
    for key in first[n]:
        b = statistics.median(r["median_us"][n][key] for r in runs["before"])
        a = statistics.median(r["median_us"][n][key] for r in runs["after"])
        print(f"{key + ' @' + n:44s} {b:10.1f} {a:10.1f} {a / b:13.3f}")
