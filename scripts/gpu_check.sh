#!/usr/bin/env bash
# The GPU check (ARCHITECTURE.md section 6), sized for one 15-minute GPU lease that includes the
# machine's start: at most 540 s (9 min) of run time on a fresh machine with no network (today an
# H200: 16 cores, Python 3.12, torch 2.11+cu130 with its Triton 3.6, nvcc 13.0, pytest,
# pytest-benchmark, pytest-timeout; bitsandbytes only if its wheel was carried).
#
#   ONEPASS_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh [DEST]
#   through the device tool: run(command="ONEPASS_COMMIT=<sha> bash scripts/gpu_check.sh $OUT",
#                                timeout_s=580)   # 540 s here + 40 s of margin
#
# DEST: $1, else $OUT, else bench/results/gpu-<UTC date>/. Commit that folder's files to
# bench/results/ with the GPU name, torch version and commit (all in stages.json and the log).
#
# Stages, in order of value. Each runs under `timeout`; stage i must end by the mark
# T0 + budget_1 + ... + budget_i, so a stage that ends early hands its slack to the next ones and
# a stage that overruns is cut at its own mark; no stage runs past T0 + GPU_CHECK_TOTAL - 15 s
# (15 s kept for the summary). GPU_CHECK_ROLLOVER=0: each stage gets min(its budget, time left).
#
#   stage       budget  expected  evidence
#   machine       30 s    5-15 s  nvidia-smi + two python imports; the first torch import on a
#                                 fresh machine reads ~2 GB of libraries from a cold disk.
#   build        230 s  120-160 s The H100 (16 cores) built the CPU-only extension of bcd5656 in
#                                 44 s (bench/results/gpu-h100-20261123/gpu_check.log) when the
#                                 README said "~1.5 min on 2 cores" (215f9d1): ~0.5x the 2-core
#                                 time. Since then the statistics doubled every loop (7a16eb5:
#                                 "~6 min on 2 cores"); here (2-core EPYC, busy) cc1plus on
#                                 csrc/cpu/adam_cpu.cpp alone took ~3 min (2.6 min of CPU seen
#                                 before it ended) in a pip install -e . at 75d75bf. That
#                                 one translation unit (three SIMD variants x every format, with
#                                 and without statistics) was the critical path (its loops are
#                                 now csrc/cpu/loops_full.cpp and loops_lowp.cpp, compiled side
#                                 by side: the 2-core CPU build went from 3.2 to 2.3 min): g++
#                                 compile one file on one core, so MAX_JOBS=16 only runs the
#                                 files side by side (ops.cpp, batch_checks.cpp, each .cu of
#                                 csrc/cuda/). ~0.6 x 180 s ~ 110-130 s for it on the host's
#                                 faster core, + link of a ~40 MB .so and pip's own work (~20 s).
#                                 The .cu files (the JIT add-on with them took ~4 min busy / ~2.5
#                                 quiet on 2 cores, a30d72d) compile beside it; TORCH_CUDA_ARCH_LIST
#                                 is set to this GPU's arch (setup.py's default "8.0;9.0" would
#                                 make nvcc compile every kernel twice). CI's ahead-of-time CUDA
#                                 build on 2 cores (~410 s, per the brief; not found in git; .ci/run
#                                 gives "~6 min to build both ways" quiet) is the 2-core sum of
#                                 these files, not the 16-core critical path.
#   tests_gpu     90 s   50-70 s  pytest -m "cuda or triton" (test_matrix's cuda cases for the
#                                 reference, cuda and triton backends, test_cuda.py,
#                                 test_triton.py) minus the stage-4 files. H100: the whole suite
#                                 of the time (308 tests, with the matrix on cuda tensors for the
#                                 reference backend) took 33.7 s; the 29 triton matrix cases took
#                                 17.7 s with their Triton compiles (triton.md). ~110 cases now
#                                 (99 matrix cases on cuda tensors, 5 + 8 in the two files).
#   bench_cuda    70 s   40-50 s  one `python -m onepass` per case (gpt2, small, huge), so a cut
#                                 run keeps the cases that ended. H100 (4 contestants, 10
#                                 rounds, 3 cases): 30 s (junit end 07:53:26 to the JSON's date,
#                                 stamped at the end, 07:53:56), of which ~20 s the reference backend's
#                                 steps (1.16 s a small step) and ~10 s start-up. Now ~9
#                                 contestants on compiled kernels: a round costs ~25 ms (gpt2),
#                                 ~200 ms (small, torch-forloop 143 ms of it), ~120 ms (huge), so
#                                 GPU_ROUNDS=20 (+2 warm-up) is ~8 s of steps; each process adds
#                                 ~10 s (imports, CUDA context, probes, Triton tuning). A case is
#                                 capped at 45 s: a contestant that falls back to the reference
#                                 backend (~1.2 s a small step) costs that case, not the stage.
#   tests_long    80 s  100-200 s test_lowp_cuda.py (~230 cases, never run on a GPU yet),
#                                 test_cuda_graphs.py, test_lowp_triton.py (~50),
#                                 test_stats_triton.py (~25), test_statistics.py (CPU kernel on
#                                 this host's AVX-512), then the GPU cases that carry no marker
#                                 (test_resume.py's cuda cases, test_property.py's cuda
#                                 backends). Each Triton variant compiles once (~0.5-2 s); the
#                                 reference side runs on the CPU. No GPU timing exists yet: this
#                                 stage lives on the slack of the ones before (~60-110 s) and is
#                                 cut first; pytest is stopped by SIGINT, so junit_long.xml
#                                 still lists every test that ran.
#   bench_cpu     25 s   15-25 s  host CPU (gpt2, small; 5 contestants, 10 rounds). H100 host:
#                                 21 s for 4 contestants incl. start-up (JSON dates 07:53:56 to
#                                 07:54:17); int8 (~110 ms a gpt2 step there) and bf16 add ~4 s.
#   (summary)     15 s     ~5 s   reserved at the end: reads what exists.
#   total        540 s
#
# Output folder (the device tool returns at most 8 files from $OUT; this writes 7), each file
# written as its stage goes or ends, so a run cut off at its limit still returns what it did:
#   gpu_check.log   machine/commit header first, then every stage's output as it is printed
#   stages.json     machine, commit and one record per stage (status ok|failed|timeout|skipped|
#                   running, rc, seconds, limit, budget, timed_out, log line), rewritten at each
#                   stage's start and end
#   build.log       pip -v output with seconds since the build started on each line
#   junit_gpu.xml, junit_long.xml       the two pytest stages
#   bench_cuda.json, bench_cpu.json     the benchmark, rewritten after each case
# Exit status: 0 only if every stage ended ok; 1 otherwise (failed, timed out or not reached).
#
# GPU_CHECK_DRY=1: the same bookkeeping with stand-ins for the heavy commands (no build, tiny
# pytest files, the CPU benchmark with --quick), for checking this script on a machine without a
# GPU. Knobs: GPU_CHECK_TOTAL, BUDGET_<STAGE> (e.g. BUDGET_TESTS_LONG), GPU_ROUNDS, MAX_JOBS,
# PYTHON, GPU_CHECK_ROLLOVER, DRY_BUILD_SLEEP, DRY_LONG_SLEEP.
set -u
set -o pipefail

DEST=${1:-${OUT:-}}
if [ -n "$DEST" ]; then  # a relative DEST is the caller's
  mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd) || { echo "gpu_check: cannot create $DEST" >&2; exit 1; }
fi
cd "$(dirname "$0")/.." || exit 1
if [ -z "$DEST" ]; then
  DEST=$PWD/bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)
  mkdir -p "$DEST" || exit 1
fi

T0=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL:-540}
SUMMARY_RESERVE=${GPU_CHECK_SUMMARY_RESERVE:-15}
DEADLINE=$((T0 + TOTAL - SUMMARY_RESERVE))
ROLLOVER=${GPU_CHECK_ROLLOVER:-1}
MIN_STAGE_S=5          # a stage with less left than this is recorded as skipped
KILL_GRACE=5           # after the stage's signal, SIGKILL this many seconds later
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
GPU_ROUNDS=${GPU_ROUNDS:-20}
CASE_CAP=${GPU_CHECK_CASE_CAP:-45}
LOG=$DEST/gpu_check.log
STAGES=$DEST/stages.json
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1  # no network there
# The emulated cuda kernels (tests/conftest.py builds them) run in CI; here the real ones do.
export ONEPASS_EMU=0
: >"$LOG"

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
jstr() {  # a JSON string
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}; s=${s//$'\t'/ }; s=${s//$'\n'/ }; s=${s//$'\r'/}
  printf '"%s"' "$s"
}

# --- the header: commit first (needs no python), then the machine ---------------------------------
COMMIT=${ONEPASS_COMMIT:-}
if [ -z "$COMMIT" ] && git rev-parse --verify -q HEAD >/dev/null 2>&1; then
  COMMIT=$(git rev-parse --verify -q HEAD)
  [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || COMMIT="$COMMIT+dirty"
fi
[ -n "$COMMIT" ] || COMMIT="unknown (no git history here: pass ONEPASS_COMMIT=\$(git rev-parse HEAD))"
GPU="?" TORCH_V="?" TRITON_V="?" CUDA_V="?" ARCH=""
say "onepass GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT"
say "output $DEST; run-time budget $TOTAL s$([ "$DRY" = 1 ] && echo ' (DRY RUN: stand-ins for the heavy commands)')"

# --- stage bookkeeping ------------------------------------------------------------------------------
R_NAME=() R_STATUS=() R_RC=() R_SECS=() R_LIMIT=() R_BUDGET=() R_TO=() R_LINE=()
OVERALL=0
MARK=$T0
write_stages() {  # stages.json from the records (+ the running stage, if any), atomically
  local i sep="" out=$STAGES.tmp
  {
    printf '{\n "schema": 1,\n "commit": %s,\n "dry_run": %s,\n' "$(jstr "$COMMIT")" "$([ "$DRY" = 1 ] && echo true || echo false)"
    printf ' "machine": {"gpu": %s, "torch": %s, "cuda": %s, "triton": %s, "arch": %s},\n' \
      "$(jstr "$GPU")" "$(jstr "$TORCH_V")" "$(jstr "$CUDA_V")" "$(jstr "$TRITON_V")" "$(jstr "$ARCH")"
    printf ' "started": %s,\n "elapsed_s": %d,\n "total_budget_s": %d,\n "rollover": %s,\n "stages": [' \
      "$(jstr "$(date -u -d "@$T0" +%Y-%m-%dT%H:%M:%SZ)")" "$(( $(date +%s) - T0 ))" "$TOTAL" \
      "$([ "$ROLLOVER" = 1 ] && echo true || echo false)"
    for i in "${!R_NAME[@]}"; do
      printf '%s\n  {"name": %s, "status": %s, "rc": %s, "seconds": %d, "limit_s": %d, "budget_s": %d, "timed_out": %s, "log_line": %d}' \
        "$sep" "$(jstr "${R_NAME[$i]}")" "$(jstr "${R_STATUS[$i]}")" "${R_RC[$i]:-null}" "${R_SECS[$i]}" \
        "${R_LIMIT[$i]}" "${R_BUDGET[$i]}" "${R_TO[$i]}" "${R_LINE[$i]}"
      sep=","
    done
    printf '\n ]\n}\n'
  } >"$out" && mv -f "$out" "$STAGES"
}
record() {  # record INDEX name status rc secs limit budget timed_out line
  local i=$1
  R_NAME[$i]=$2 R_STATUS[$i]=$3 R_RC[$i]=$4 R_SECS[$i]=$5 R_LIMIT[$i]=$6 R_BUDGET[$i]=$7 R_TO[$i]=$8 R_LINE[$i]=$9
  write_stages
}

STAGE_END=0 STAGE_TIMED_OUT=0
stage() {  # stage NAME BUDGET FUNCTION
  local name=$1 budget=$2 fn=$3 now end limit line i rc secs status
  now=$(date +%s)
  MARK=$((MARK + budget))
  if [ "$ROLLOVER" = 1 ]; then end=$MARK; else end=$((now + budget)); fi
  ((end > DEADLINE)) && end=$DEADLINE
  limit=$((end - now))
  line=$(( $(wc -l <"$LOG") + 2 ))
  i=${#R_NAME[@]}
  if ((limit < MIN_STAGE_S)); then
    say ""
    say "=== $name: SKIPPED, ${limit} s left before its deadline ($((now - T0)) s since start)"
    record "$i" "$name" skipped "" 0 "$((limit > 0 ? limit : 0))" "$budget" true "$line"
    OVERALL=1
    return
  fi
  say ""
  say "=== $name (limit $limit s, budget $budget s, at $((now - T0)) s)"
  record "$i" "$name" running "" 0 "$limit" "$budget" false "$line"
  STAGE_END=$end STAGE_TIMED_OUT=0
  "$fn"
  rc=$?
  secs=$(( $(date +%s) - now ))
  if ((STAGE_TIMED_OUT)); then status=timeout; elif ((rc != 0)); then status=failed; else status=ok; fi
  [ "$status" = ok ] || OVERALL=1
  record "$i" "$name" "$status" "$rc" "$secs" "$limit" "$budget" "$([ "$status" = timeout ] && echo true || echo false)" "$line"
  say "=== $name: $status (rc $rc, $secs s of $limit s)"
}

# run [--cap N] [--int] [--log FILE] CMD...: CMD under timeout, never past the stage's end, its
# output appended to the log (or to FILE, stamped with seconds) and shown. --int: stop it with
# SIGINT (pytest then still writes its junit XML); else SIGTERM. SIGKILL KILL_GRACE s later.
# Returns CMD's status (124/137 when cut off, then the stage counts as timed out).
run() {
  local cap=0 sig=TERM file="" left t rc
  while :; do
    case $1 in
      --cap) cap=$2; shift 2 ;;
      --int) sig=INT; shift ;;
      --log) file=$2; shift 2 ;;
      *) break ;;
    esac
  done
  left=$((STAGE_END - $(date +%s)))
  ((cap > 0 && cap < left)) && left=$cap
  if ((left < 1)); then
    say "(no time left for: $*)"
    STAGE_TIMED_OUT=1
    return 124
  fi
  t=$(date +%s)
  if [ -n "$file" ]; then
    timeout -s "$sig" -k "$KILL_GRACE" "$left" "$@" 2>&1 | stamp >>"$file"
  else
    timeout -s "$sig" -k "$KILL_GRACE" "$left" "$@" 2>&1 | tee -a "$LOG"
  fi
  rc=${PIPESTATUS[0]}
  if ((rc == 124 || (rc == 137 && $(date +%s) - t >= left))); then
    STAGE_TIMED_OUT=1
    say "(cut off after $left s: $*)"
  fi
  return "$rc"
}
# extend N: give the quick follow-ups of a stage (a fallback install, an import check) N more s
# past its end, within the deadline; the next stage's limit shrinks accordingly.
extend() {
  local want=$(( $(date +%s) + $1 ))
  ((want > STAGE_END)) && STAGE_END=$want
  ((STAGE_END > DEADLINE)) && STAGE_END=$DEADLINE
}
left_s() { local l=$((STAGE_END - $(date +%s))); echo $((l > 1 ? l : 1)); }
stamp() { local s=$SECONDS line; while IFS= read -r line; do printf '[%4d s] %s\n' $((SECONDS - s)) "$line"; done; }

# pytest with SIGINT turned back into KeyboardInterrupt: a job started in the background can
# inherit SIGINT ignored, and pytest writes its junit XML only when it gets to end its session.
PYTEST=("$PY" -c 'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))')
PYTEST_OPTS=(-q -rfEs -p no:cacheprovider)
# The long suites (stage tests_long), left out of tests_gpu so that no test runs twice.
LONG_FILES=(tests/backends/test_lowp_cuda.py tests/test_cuda_graphs.py tests/backends/test_lowp_triton.py
            tests/backends/test_stats_triton.py tests/test_statistics.py)
# GPU cases without a cuda/triton marker (so not in tests_gpu): test_resume's cuda backend cases,
# test_property's cuda backends. Last, as they matter least.
UNMARKED_GPU_FILES=(tests/test_resume.py tests/test_property.py)
CUDA_CONTESTANTS=onepass,onepass-cuda,onepass-triton,torch-fused,torch-foreach,torch-forloop,optimi,bitsandbytes,torchao,onepass-bf16,onepass-int8,bitsandbytes-8bit,onepass-stats
CPU_CONTESTANTS=onepass,torch-fused,onepass-bf16,onepass-int8,onepass-stats

# --- the stages -----------------------------------------------------------------------------------
st_machine() {
  local info
  if command -v nvidia-smi >/dev/null; then
    run --cap 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    say "nvidia-smi: not found"
  fi
  info=$(timeout -k 5 "$(left_s)" "$PY" - 2>&1 <<'PY'
import sys
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU"
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    print(f"torch={torch.__version__}\ncuda={torch.version.cuda}\ngpu={gpu}")
    print("arch=" + (f"{cap[0]}.{cap[1]}" if cap else ""))
except Exception as e:
    print(f"torch=not importable ({type(e).__name__}: {e})")
try:
    import triton
    print(f"triton={triton.__version__}")
except Exception as e:
    print(f"triton=not importable ({type(e).__name__})")
print(f"python={sys.version.split()[0]} ({sys.executable})")
PY
  )
  local rc=$?
  say "$info"
  GPU=$(sed -n 's/^gpu=//p' <<<"$info"); TORCH_V=$(sed -n 's/^torch=//p' <<<"$info")
  CUDA_V=$(sed -n 's/^cuda=//p' <<<"$info"); TRITON_V=$(sed -n 's/^triton=//p' <<<"$info")
  ARCH=$(sed -n 's/^arch=//p' <<<"$info")
  : "${GPU:=?}" "${TORCH_V:=?}" "${TRITON_V:=?}" "${CUDA_V:=?}"
  say "nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo 'not found')"
  say "gcc: $(command -v gcc >/dev/null && gcc --version | head -1 || echo 'not found')"
  say "cpu: $(nproc 2>/dev/null) threads, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)," \
      "$(grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo AVX-512 || echo 'no AVX-512')"
  say "python packages: $(timeout -k 2 "$(left_s)" "$PY" -m pip list 2>/dev/null | grep -iE '^(bitsandbytes|torchao|torch-optimi|pytest-timeout|hypothesis) ' | tr -s ' ' | paste -sd, -)"
  return $rc
}

st_build() {
  local rc
  if [ "$DRY" = 1 ]; then
    say "[dry] pip install -e . skipped; sleeping ${DRY_BUILD_SLEEP:-2} s instead"
    run --log "$DEST/build.log" bash -c "echo '[dry] no build'; sleep ${DRY_BUILD_SLEEP:-2}; echo '[dry] done'"
    rc=$?
  else
    # The toolkit's folder (nvcc may be a wrapper), and the CUDA 13 wheels' headers that torch's
    # own headers include, as scripts/check_cuda_build.sh finds them.
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
      local top
      top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
      [ -n "$top" ] && export CUDA_HOME=$(cd "$top" && pwd)
    fi
    local inc
    inc=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu13', 'include'))" 2>/dev/null)
    [ -n "$inc" ] && [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
    # This GPU's arch only (setup.py's default "8.0;9.0" compiles every kernel twice).
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}
    say "pip install -e . (MAX_JOBS=${MAX_JOBS:-16}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, CUDA_HOME=${CUDA_HOME:-unset}); full output in build.log"
    ONEPASS_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} run --log "$DEST/build.log" \
      "$PY" -m pip install -v --no-index --no-deps --no-build-isolation -e .
    rc=$?
    if ((rc != 0)); then
      say "BUILD FAILED or cut off (rc $rc); the end of build.log:"
      grep -E "error|Error|FAILED" "$DEST/build.log" | head -20 | tee -a "$LOG"
      tail -15 "$DEST/build.log" | tee -a "$LOG"
      # Install the package without the extension (seconds), so that the later stages still test
      # and time the Triton kernels instead of failing at `import onepass`.
      say "installing onepass without the extension (ONEPASS_NO_EXT=1) for the later stages"
      extend 60
      ONEPASS_NO_EXT=1 run --cap 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
    else
      say "build ok: $(grep -cE '^\[ *[0-9]+ s\] \[[0-9]+/[0-9]+\]' "$DEST/build.log") ninja steps; the last ones:"
      grep -E '^\[ *[0-9]+ s\] \[[0-9]+/[0-9]+\]' "$DEST/build.log" | cut -c1-160 | tail -6 | tee -a "$LOG"
    fi
  fi
  # What the later stages will run on. ONEPASS_JIT=0 from here on: naming backend="cuda" without
  # prebuilt kernels would start a JIT build of minutes inside a test or benchmark stage.
  local dry=$DRY
  extend 30
  ONEPASS_JIT=0 run --cap 30 "$PY" - "$dry" <<'PY'
import sys
import torch
import onepass
from onepass import _ops
print("backends cpu:", onepass.available_backends("cpu"), "cuda:",
      onepass.available_backends("cuda") if torch.cuda.is_available() else "no GPU")
try:
    print("cpu isa", torch.ops.onepass._cpu_isa(), torch.ops.onepass._cpu_isa_supported())
except Exception as e:  # noqa: BLE001
    print("cpu isa: unknown", type(e).__name__, e)
ok = _ops.has_prebuilt_cuda()
print("prebuilt CUDA kernels:", ok)
sys.exit(0 if ok or sys.argv[1] == "1" else 3)  # a GPU check without the CUDA kernels failed
PY
  local rc2=$?
  ((rc != 0)) && return $rc
  return $rc2
}

st_tests_gpu() {
  local ign=() f
  for f in "${LONG_FILES[@]}" "${UNMARKED_GPU_FILES[@]}"; do ign+=(--ignore="$f"); done
  if [ "$DRY" = 1 ]; then
    run --int "${PYTEST[@]}" "$WORK/dry/test_dry_gpu.py" "${PYTEST_OPTS[@]}" --junitxml="$DEST/junit_gpu.xml"
  else
    run --int "${PYTEST[@]}" tests -m "cuda or triton" "${ign[@]}" "${PYTEST_OPTS[@]}" "${PT_TIMEOUT[@]}" \
      --junitxml="$DEST/junit_gpu.xml"
  fi
}

st_tests_long() {
  if [ "$DRY" = 1 ]; then
    run --int "${PYTEST[@]}" "$WORK/dry/test_dry_long.py" "${PYTEST_OPTS[@]}" --junitxml="$DEST/junit_long.xml"
  else
    run --int "${PYTEST[@]}" "${LONG_FILES[@]}" "${UNMARKED_GPU_FILES[@]}" "${PYTEST_OPTS[@]}" "${PT_TIMEOUT[@]}" \
      --junitxml="$DEST/junit_long.xml"
  fi
}

# bench DEVICE OUTNAME CONTESTANTS CASE... [-- EXTRA ARGS]: one process per case, merged into
# DEST/OUTNAME after each, so a case cut off by its limit costs only itself.
bench() {
  local device=$1 out=$2 contestants=$3 case rc status=0 parts=() missing=() extra=()
  shift 3
  local cases=()
  while (($#)) && [ "$1" != -- ]; do cases+=("$1"); shift; done
  (($#)) && { shift; extra=("$@"); }
  if [ "$DRY" = 1 ]; then device=cpu; extra+=(--quick); fi
  for case in "${cases[@]}"; do
    say "--- $case"
    run --cap "$CASE_CAP" "$PY" -m onepass --device "$device" --cases "$case" --contestants "$contestants" \
      "${extra[@]}" --json "$WORK/$out.$case.json" --no-progress
    rc=$?
    local check=()
    if [ -s "$WORK/$out.$case.json" ]; then
      parts+=("$WORK/$out.$case.json"); check=(--check-last)
    else
      missing+=(--missing "$case:rc $rc")
    fi
    ((rc != 0)) && status=$rc
    "$PY" scripts/gpu_check_report.py merge "$DEST/$out" "${parts[@]}" --commit "$COMMIT" "${missing[@]}" "${check[@]}" 2>&1 | tee -a "$LOG"
    ((${PIPESTATUS[0]} != 0 && status == 0)) && status=1
  done
  return $status
}
st_bench_cuda() { bench cuda bench_cuda.json "$CUDA_CONTESTANTS" gpt2 small huge -- --rounds "$GPU_ROUNDS"; }
st_bench_cpu() { bench cpu bench_cpu.json "$CPU_CONTESTANTS" gpt2 small; }

# --- run ------------------------------------------------------------------------------------------
PT_TIMEOUT=()
if [ "$DRY" = 1 ]; then
  mkdir -p "$WORK/dry"
  printf 'import pytest\ndef test_one(): pass\ndef test_two(): pass\n@pytest.mark.skip(reason="dry: a skip")\ndef test_skipped(): pass\n' >"$WORK/dry/test_dry_gpu.py"
  printf 'import time\ndef test_quick(): pass\ndef test_hangs(): time.sleep(%s)\ndef test_never_reached(): pass\n' "${DRY_LONG_SLEEP:-600}" >"$WORK/dry/test_dry_long.py"
fi

stage machine "${BUDGET_MACHINE:-30}" st_machine
write_stages
# A hanging test (a GPU deadlock) costs one test's 60 s, not the stage: pytest-timeout is on the
# GPU image; its signal method fails the test and goes on.
"$PY" -c "import pytest_timeout" 2>/dev/null && PT_TIMEOUT=(--timeout=60 --timeout-method=signal)
stage build "${BUDGET_BUILD:-230}" st_build
export ONEPASS_JIT=0
stage tests_gpu "${BUDGET_TESTS_GPU:-90}" st_tests_gpu
stage bench_cuda "${BUDGET_BENCH_CUDA:-70}" st_bench_cuda
stage tests_long "${BUDGET_TESTS_LONG:-80}" st_tests_long
stage bench_cpu "${BUDGET_BENCH_CPU:-25}" st_bench_cpu
write_stages

say ""
say "=== summary ($(( $(date +%s) - T0 )) s since start)"
timeout -k 5 "$SUMMARY_RESERVE" "$PY" scripts/gpu_check_report.py summary "$DEST" 2>&1 | tee -a "$LOG"
say "gpu_check: $([ $OVERALL = 0 ] && echo 'every stage ok' || echo 'NOT every stage ok (see stages above)'); exit $OVERALL"
exit $OVERALL
