"""onepass: AdamW for PyTorch in one memory pass.

    import onepass
    opt = onepass.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

Every backend (``cpu``, and later ``cuda``/``triton``) produces the bits of
:mod:`onepass.reference`, the plain-PyTorch statement of the arithmetic.
"""
__version__ = "0.1.0"

from . import _ops, reference  # noqa: E402,F401  (_ops loads the compiled kernels, if built)
from .backends import available_backends  # noqa: E402
from .decay import decay_half_life, normalized_weight_decay, param_groups  # noqa: E402
from .optimizer import Adam, AdamW  # noqa: E402

__all__ = ["AdamW", "Adam", "reference", "available_backends", "param_groups",
           "normalized_weight_decay", "decay_half_life", "__version__"]
