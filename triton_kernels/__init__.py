"""Triton kernels of onepass (installed as onepass.triton_kernels): adam.py, launched by the
"triton" backend (python/onepass/backends/triton.py)."""
