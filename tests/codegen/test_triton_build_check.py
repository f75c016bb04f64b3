"""scripts/check_triton_build.py: every Triton kernel variant the backend launches compiles for
sm_90 (no GPU needed) with PTX that keeps the reference's bits; and the check fails on a planted
contraction (the kernels compiled with fp fusion, as Triton does by default)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "check_triton_build.py")


def _can_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"triton cannot compile here: {exc}"
    return None


_why = _can_compile_for_sm90()
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))

# The planted bug: every variant compiled with enable_fp_fusion=True.
PLANT = """
import sys
sys.argv = ["check_triton_build.py"]
sys.path.insert(0, {scripts!r})
import check_triton_build as c
variant = c._variant
def fused(fn, args, kwargs):
    sig, consts, options = variant(fn, args, kwargs)
    return sig, consts, dict(options, enable_fp_fusion=True)
c._variant = fused
sys.exit(c.main())
"""


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)


def test_every_triton_variant_compiles_for_sm90_with_exact_arithmetic():
    out = _run([SCRIPT])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " 0 failures" in out.stdout
    n = int(out.stdout.split("check_triton_build: ")[-1].split(" of ")[0])
    assert n >= 25  # every format, dtype, rounding and flag of the backend


def test_the_check_fails_on_contracted_arithmetic():
    out = _run(["-c", PLANT.format(scripts=os.path.join(ROOT, "scripts"))])
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert ": fma: fma.rn.f32" in out.stdout
