"""Shared test setup.

Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors (this is how CI
tests them); the variable must be set before triton is imported, hence here. With a GPU they run
compiled, on CUDA tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
