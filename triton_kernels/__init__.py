"""Triton kernels of onepass (installed as onepass.triton_kernels). The Triton backend is built in
a later issue; until then this package holds no kernels and the "triton" backend reports itself
unavailable."""
