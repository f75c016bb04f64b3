#!/usr/bin/env bash
# The GPU check (ARCHITECTURE.md section 6). Runs on a machine with an NVIDIA GPU and no network
# (reference machine: Python 3.12, torch 2.11+cu130, triton 3.6, pytest, pytest-benchmark):
#   1. builds the extension offline against the installed torch,
#   2. runs the whole test suite (the CUDA cases run because a GPU is present),
#   3. runs the benchmark on the GPU (cases gpt2, small, huge) and on the host CPU,
# and writes the log and JSON figures under $OUT (or the folder given as $1), ending with a
# short table. Commit the folder's files to bench/results/ with the GPU name, torch version and
# commit (the JSON files carry the machine; the device copy has no .git, so pass
# ONEPASS_COMMIT=$(git rev-parse HEAD) in the command to record the commit in the log).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0

step() { echo; echo "=== $*"; }
{
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || echo "triton not importable"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo "${ONEPASS_COMMIT:-unknown} (no .git here; set ONEPASS_COMMIT)")"
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/\(Flags:\).*\(avx512f\).*/\1 ... \2 .../' | head -3

  step "build"
  t0=$(date +%s)
  if ONEPASS_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
    echo "build ok in $(( $(date +%s) - t0 )) s"
  else
    echo "BUILD FAILED"; status=1
  fi
  "$PY" -c "import onepass, torch; print('backends cpu:', onepass.available_backends('cpu'), 'cuda:', onepass.available_backends('cuda')); print('cpu isa', torch.ops.onepass._cpu_isa(), torch.ops.onepass._cpu_isa_supported())"

  step "tests"
  "$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml="$DEST/junit.xml" || status=1

  step "benchmark: cuda"
  "$PY" -m onepass --device cuda --cases gpt2,small,huge --rounds ${GPU_ROUNDS:-20} \
    --contestants onepass,onepass-triton,torch-fused,torch-foreach,torch-forloop,optimi,bitsandbytes,torchao,onepass-bf16,onepass-int8,bitsandbytes-8bit,onepass-stats \
    --json "$DEST/bench_cuda.json" --no-progress || status=1

  step "benchmark: host cpu"
  "$PY" -m onepass --device cpu --cases gpt2,small --contestants onepass,torch-fused,onepass-bf16,onepass-int8,onepass-stats \
    --json "$DEST/bench_cpu.json" --no-progress || status=1
} 2>&1 | tee "$LOG"

step "summary" | tee -a "$LOG"
"$PY" - "$DEST" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys, re
dest = sys.argv[1]
log = open(os.path.join(dest, "gpu_check.log")).read()
m = re.findall(r"^=* ?(\d+ (?:passed|failed)[^\n]*)", log, re.M)
print("tests:", m[-1] if m else "no pytest summary found")
for name in ("bench_cuda.json", "bench_cpu.json"):
    path = os.path.join(dest, name)
    if not os.path.exists(path):
        print(name, "missing"); continue
    res = json.load(open(path))
    try:
        from onepass.benchmark import format_table
        print(format_table(res))
    except Exception as exc:  # the table is a convenience; the JSON is the record
        print(name, "written;", exc)
PYEOF
exit $status
