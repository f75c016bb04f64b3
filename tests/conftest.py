"""Shared test setup.

Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors (this is how CI
tests them); the variable must be set before triton is imported, hence here. With a GPU they run
compiled, on CUDA tensors.

The cuda backend's kernels run everywhere under the SIMT emulation (csrc/emu/, ARCHITECTURE.md
section 7): the module is built here, before collection (~30 s on 2 cores, cached by torch), and
its backends ("cuda-emu", "cuda-emu-capturable") are registered, so every test that walks the
available CPU backends -- the bit-exact matrix, the property test, the optimizer tests -- runs
them too. ONEPASS_EMU=0 leaves them out (scripts/gpu_check.sh, where the real kernels run).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("ONEPASS_EMU", "1") != "0":
    from onepass import _ops
    from onepass.backends import cuda_emu

    if _ops.HAS_EXT:  # without the extension onepass runs on the reference only (test_import.py)
        cuda_emu.enable()
