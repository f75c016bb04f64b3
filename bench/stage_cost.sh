#!/usr/bin/env bash
# Builds and runs bench/stage_cost.cpp with the CPU kernel's flags (python/onepass/_build.py's
# CXX_FLAGS, which keep a*b+c uncontracted) and prints each stage's ns per element.
set -euo pipefail
cd "$(dirname "$0")"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
g++ -std=c++17 -O3 -ffp-contract=off -fno-math-errno -fopenmp -fno-tree-slp-vectorize -Wno-psabi \
  stage_cost.cpp -o "$OUT/stage_cost"
taskset -c 0 "$OUT/stage_cost" 2>/dev/null || "$OUT/stage_cost"
