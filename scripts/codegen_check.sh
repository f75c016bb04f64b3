#!/usr/bin/env bash
# Static checks on the device code of a built library (scripts/check_codegen.py): no FP
# contraction, no .approx/.ftz, div/sqrt only .rn in the PTX; no local memory in the SASS; 128-bit
# global loads and stores in the fp32/bf16 element-wise kernels.
#
#   bash scripts/codegen_check.sh LIBRARY PYTHON [check_codegen.py options...]
#
# LIBRARY: the built .so (or .o) with sm_90 SASS *and* PTX (torch: TORCH_CUDA_ARCH_LIST=9.0+PTX).
# PYTHON: the python of the CUDA venv (scripts/check_cuda_build.sh's .venv-cuda). cuobjdump and
# the nvdisasm it runs for -sass come from PATH when both are there (a full CUDA toolkit), else
# from the pip wheels nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm, installed into that venv when
# missing (~1 s, 5 MB; 13.2.51 is the oldest CUDA 13 release of these wheels, and a newer
# cuobjdump reads older nvcc's output). Exits non-zero on any violation or when no kernel is found.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 LIBRARY PYTHON [check_codegen.py options]" >&2; exit 2; }
LIB=$1 PY=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=${ONEPASS_CUOBJDUMP_VERSION:-13.2.51}
if ! { command -v cuobjdump && command -v nvdisasm; } >/dev/null; then
  if ! "$PY" -c "import importlib.metadata as m; m.version('nvidia-cuda-cuobjdump'); m.version('nvidia-cuda-nvdisasm')" 2>/dev/null; then
    echo "codegen_check: installing nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm $VERSION into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install -q "nvidia-cuda-cuobjdump==$VERSION" "nvidia-cuda-nvdisasm==$VERSION"
  fi
fi
start=$(date +%s)
"$PY" "$HERE/check_codegen.py" --python "$PY" "$@" "$LIB"
echo "codegen_check: ok in $(( $(date +%s) - start )) s"
