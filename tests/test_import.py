"""onepass imports and trains without its compiled extension, with one warning that says why."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_package_works_without_the_extension():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["onepass._C"] = None          # as if the extension were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import onepass
        msgs = [str(w.message) for w in caught if "onepass" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "reference backend" in msgs[0], msgs
        assert "cpu" not in onepass.available_backends("cpu"), onepass.available_backends("cpu")
        assert "reference" in onepass.available_backends("cpu")
        import torch
        p = torch.nn.Parameter(torch.ones(3))
        opt = onepass.AdamW([p], lr=0.1)
        p.grad = torch.ones(3)
        opt.step()
        assert torch.all(p < 1)
        try:
            onepass.AdamW([p], backend="cpu").step()
        except RuntimeError as e:
            assert "unavailable" in str(e) and "extension" in str(e), e
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
