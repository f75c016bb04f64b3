"""Build of onepass: the C++ CPU kernels as the extension onepass._C (torch.utils.cpp_extension).

`pip install --no-build-isolation -e .` needs torch installed first (the extension is built
against it). If the extension cannot be built, the package still installs and runs on the
reference backend; onepass warns once at import and says why.
"""
import os
import runpy
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

# The flags and source lists, shared with the JIT build of the CUDA kernels (python/onepass/_ops.py).
BUILD = runpy.run_path(os.path.join(HERE, "python", "onepass", "_build.py"))
CXX_FLAGS, NVCC_FLAGS = BUILD["CXX_FLAGS"], BUILD["NVCC_FLAGS"]


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
WITH_CUDA = (
    os.environ.get("ONEPASS_CUDA") != "0" and torch.version.cuda is not None and CUDA_HOME is not None
)
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD["DEFAULT_ARCH_LIST"])

ext_modules = []
if os.environ.get("ONEPASS_NO_EXT") != "1":
    sources = ["csrc/" + name for name in BUILD["CPU_SOURCES"]]
    if WITH_CUDA:
        ext_modules.append(CUDAExtension(
            "onepass._C",
            sources=sources + ["csrc/" + name for name in BUILD["CUDA_SOURCES"]],
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
