"""The CUDA kernels' build on first use (python/onepass/_ops.py: cuda_module).

The decisions are tested here with torch.utils.cpp_extension.load replaced by a recorder, so they
run on any machine; scripts/check_cuda_build.sh makes the real JIT build against a CUDA torch, and
on a GPU tests/backends/test_cuda.py runs whatever cuda_module() returns."""
from __future__ import annotations

import types

import pytest
import torch
from torch.utils import cpp_extension

from onepass import _build, _ops
from onepass.backends import BACKENDS, resolve_backend

CUDA = torch.device("cuda")


@pytest.fixture
def jit_env(monkeypatch):
    """A machine where the JIT build can be tried: CUDA torch, nvcc, ninja, no prebuilt kernels."""
    calls = []
    fake = types.SimpleNamespace(adam_step_cuda=lambda *a, **k: None)

    def load(**kwargs):
        calls.append(kwargs)
        if isinstance(state["result"], Exception):
            raise state["result"]
        return state["result"]

    state = {"result": fake}
    monkeypatch.setattr(_ops, "has_prebuilt_cuda", lambda: False)
    monkeypatch.setattr(_ops, "_cuda_module", None)
    monkeypatch.setattr(_ops, "_cuda_jit_error", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(_ops, "_register_fakes", lambda: None)
    monkeypatch.delenv("ONEPASS_JIT", raising=False)
    return types.SimpleNamespace(calls=calls, fake=fake, state=state)


def test_naming_cuda_builds_once_with_the_setup_py_flags(jit_env, monkeypatch):
    monkeypatch.setattr(_ops, "HAS_EXT", True)
    assert BACKENDS["cuda"].unavailable_reason(CUDA) is None
    assert _ops.cuda_module() is jit_env.fake
    assert len(jit_env.calls) == 1  # the second lookup reuses the loaded module
    kw = jit_env.calls[0]
    assert kw["name"] == "onepass_cuda_addon"
    assert [s.split("csrc/")[-1] for s in kw["sources"]] == _build.ADDON_SOURCES
    for flag in ("-ffp-contract=off", "-DONEPASS_CUDA_ADDON", "-DONEPASS_WITH_CUDA"):
        assert flag in kw["extra_cflags"]
    assert "-fmad=false" in kw["extra_cuda_cflags"]
    assert "--use_fast_math" not in kw["extra_cuda_cflags"]


def test_without_the_cpu_extension_the_whole_extension_is_built(jit_env, monkeypatch):
    monkeypatch.setattr(_ops, "HAS_EXT", False)
    assert _ops.cuda_module() is jit_env.fake
    kw = jit_env.calls[0]
    assert kw["name"] == "onepass_cuda_full"
    assert [s.split("csrc/")[-1] for s in kw["sources"]] == _build.CPU_SOURCES + _build.CUDA_SOURCES
    assert "-DONEPASS_CUDA_ADDON" not in kw["extra_cflags"]


def test_auto_never_starts_a_build(jit_env):
    why = BACKENDS["cuda"].auto_reason(CUDA)
    assert why is not None and "backend='cuda'" in why
    assert resolve_backend("auto", CUDA).name != "cuda"
    assert jit_env.calls == []


def test_a_failed_build_says_so_and_is_not_retried(jit_env):
    jit_env.state["result"] = RuntimeError("Error building extension 'onepass_cuda_addon'")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="JIT build of the CUDA kernels failed"):
            _ops.cuda_module()
    assert len(jit_env.calls) == 1
    why = BACKENDS["cuda"].unavailable_reason(CUDA)
    assert "onepass_cuda_addon" in why
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable.*JIT build"):
        resolve_backend("cuda", CUDA)


@pytest.mark.parametrize("setting, expected", [
    ("no_cuda_torch", "build without CUDA"),
    ("no_nvcc", "CUDA_HOME"),
    ("no_ninja", "ninja"),
    ("no_sources", "ONEPASS_CSRC"),
    ("disabled", "ONEPASS_JIT=0"),
])
def test_when_no_build_can_work_the_error_says_why(jit_env, monkeypatch, setting, expected):
    if setting == "no_cuda_torch":
        monkeypatch.setattr(torch.version, "cuda", None)
    elif setting == "no_nvcc":
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    elif setting == "no_ninja":
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    elif setting == "no_sources":
        monkeypatch.setattr(_build, "csrc_dir", lambda: None)
    else:
        monkeypatch.setenv("ONEPASS_JIT", "0")
    with pytest.raises(RuntimeError, match="cannot be JIT-built: .*" + expected):
        _ops.cuda_module()
    assert jit_env.calls == []
    assert _ops.cuda_module(build=False) is None


def test_sources_are_found_in_this_checkout():
    root = _build.csrc_dir()
    assert root is not None
    import os

    for name in _build.CPU_SOURCES + _build.CUDA_SOURCES:
        assert os.path.isfile(os.path.join(root, name)), name
