"""Build of onepass: the C++ CPU kernels as the extension onepass._C (torch.utils.cpp_extension).

`pip install --no-build-isolation -e .` needs torch installed first (the extension is built
against it). If the extension cannot be built, the package still installs and runs on the
reference backend; onepass warns once at import and says why.
"""
import os
import sys
import warnings

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("onepass: install torch first (e.g. pip install torch==2.13.0), then this package "
             "with --no-build-isolation")

HERE = os.path.dirname(os.path.abspath(__file__))

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
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
             "-fno-tree-slp-vectorize", "-fvisibility=hidden"]


class OptionalBuild(BuildExtension):
    """Builds the extension, but lets the install go on without it when the compiler fails."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any build failure means "no extension"
            if os.environ.get("ONEPASS_REQUIRE_EXT") == "1":
                raise
            warnings.warn(f"onepass: building {ext.name} failed ({exc}); onepass will run on the "
                          "reference backend only")


# CUDA kernels: built when torch has CUDA and nvcc is found (ONEPASS_CUDA=0 skips them).
# -fmad=false keeps nvcc from contracting a*b+c anywhere (adam_math.h's device path uses the _rn
# intrinsics anyway); never --use_fast_math. Architectures: TORCH_CUDA_ARCH_LIST, else 8.0 and 9.0.
WITH_CUDA = (
    os.environ.get("ONEPASS_CUDA") != "0" and torch.version.cuda is not None and CUDA_HOME is not None
)
NVCC_FLAGS = ["-O3", "-fmad=false", "--expt-relaxed-constexpr", "-Xcompiler",
              "-fno-tree-slp-vectorize", "-DONEPASS_WITH_CUDA"]
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

ext_modules = []
if os.environ.get("ONEPASS_NO_EXT") != "1":
    sources = ["csrc/ops.cpp", "csrc/cpu/adam_cpu.cpp"]
    if WITH_CUDA:
        ext_modules.append(CUDAExtension(
            "onepass._C",
            sources=sources + ["csrc/cuda/adam_cuda.cu"],
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS + ["-DONEPASS_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        ))
    else:
        ext_modules.append(CppExtension(
            "onepass._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
        ))

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuild.with_options(use_ninja=True)},
)
