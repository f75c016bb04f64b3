"""How the C++/CUDA extension is compiled: one statement for setup.py (ahead of time) and for the
JIT build of the CUDA kernels on first use (python/onepass/_ops.py). Standard library only:
setup.py runs this file before onepass is installed."""
from __future__ import annotations

import os
from typing import List, Optional

# Bit-exactness (ARCHITECTURE.md section 2): no FMA contraction; -fno-math-errno only lets sqrt
# become the IEEE vsqrtps instruction instead of a libm call with an errno check.
# -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers, so it only runs in
# parallel when compiled with OpenMP. We do NOT link libgomp ourselves: the GOMP symbols then
# resolve to the OpenMP runtime torch already loaded, so there is one thread pool (sized by
# torch.set_num_threads) instead of two competing ones.
# -fno-tree-slp-vectorize: GCC 12.2's straight-line (SLP) vectorizer drops the rounding in
# (double)(float)x when it packs such conversions in pairs (seen here: make_step_scalars<float>
# returned eps and weight_decay unrounded; a 10-line file reproduces it at -O2). The loops are
# vectorized by the loop vectorizer, which stays on.
# -Wno-psabi: gcc's note that a 32-byte vector argument (adam_element<F8>, csrc/cpu/
# float_map_avx2.h) is passed differently without AVX; those calls are only inlined into AVX2 code.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
             "-fno-tree-slp-vectorize", "-fvisibility=hidden", "-Wno-psabi"]

# -fmad=false keeps nvcc from contracting a*b+c anywhere (adam_math.h's device path uses the _rn
# intrinsics anyway); never --use_fast_math.
NVCC_FLAGS = ["-O3", "-fmad=false", "--expt-relaxed-constexpr", "-Xcompiler",
              "-fno-tree-slp-vectorize", "-DONEPASS_WITH_CUDA"]

# Ahead-of-time builds cover Ampere and Hopper unless TORCH_CUDA_ARCH_LIST says otherwise; the JIT
# build compiles for the GPUs it runs on (torch's default), which is faster.
DEFAULT_ARCH_LIST = "8.0;9.0"

CPU_SOURCES = ["ops.cpp", "batch_checks.cpp", "group_plan.cpp", "triton_table.cpp",
               "cpu/adam_cpu.cpp", "cpu/isa.cpp", "cpu/loops_full.cpp", "cpu/loops_lowp.cpp",
               "cpu/run.cpp", "cpu/stats.cpp"]
CUDA_SOURCES = ["cuda/adam_cuda.cu"]
# The JIT add-on beside a CPU-only onepass._C: the CUDA kernels, their checks and bindings only.
ADDON_SOURCES = ["ops.cpp", "batch_checks.cpp", "cuda/adam_cuda.cu"]


def csrc_dir() -> Optional[str]:
    """The folder holding the C++/CUDA sources: $ONEPASS_CSRC, else the source checkout this
    package runs from (editable installs), else None."""
    env = os.environ.get("ONEPASS_CSRC")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "..", "csrc"),):
        if os.path.isfile(os.path.join(cand, "adam_math.h")):
            return os.path.normpath(cand)
    return None


def sources(names: List[str], root: str) -> List[str]:
    return [os.path.join(root, n) for n in names]
