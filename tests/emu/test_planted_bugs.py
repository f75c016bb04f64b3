"""The emulated cuda kernels can fail: each test builds them with one bug planted at compile time
(ONEPASS_PLANTED_BUG, csrc/cuda/plan.h and kernels.cuh) and shows that the bit-exact tests the
real kernels pass -- the matrix of test_matrix.py, the int8 cases of test_lowp_cuda.py -- catch
it, while the same calls pass on the kernels as they are. ~25 s to build each variant."""
from __future__ import annotations

import pytest
import torch

from onepass import quant
from onepass.backends import BACKENDS, cuda_emu

from ..backends import test_lowp_cuda as lowp
from ..backends import test_matrix as matrix

pytestmark = [pytest.mark.emu, pytest.mark.skipif(
    "cuda-emu" not in BACKENDS,
    reason="the emulated cuda backend is not built (tests/conftest.py builds it unless ONEPASS_EMU=0)")]


@pytest.fixture
def planted(request):
    """The backend names of the kernels built with bug request.param planted (unregistered
    afterwards, so no later test picks them up)."""
    made = cuda_emu.enable(request.param)
    assert cuda_emu.build(request.param).planted_bug == request.param
    yield request.param
    cuda_emu.disable(made)


def _matrix_case(backend):
    matrix.test_backend_matches_reference_every_step("cpu", backend, torch.float32, "adamw")


def _int8_case(backend, maps=None, monkeypatch=None):
    if maps is not None:  # the table-search path: code tables and midpoints in shared memory
        monkeypatch.setattr(quant, "SIGNED_MAP", maps[0])
        monkeypatch.setattr(quant, "UNSIGNED_MAP", maps[1])
    target = lowp.Target("cpu", backend, backend)
    lowp._pair(target, torch.float32, "int8", "nearest", {}, steps=2)


@pytest.mark.parametrize("planted", [1], indirect=True)
def test_off_by_one_in_the_block_to_tensor_lookup(planted):
    _matrix_case("cuda-emu")
    with pytest.raises(AssertionError, match="differs from the reference"):
        _matrix_case(f"cuda-emu-bug{planted}")


@pytest.mark.parametrize("planted", [2], indirect=True)
def test_a_dropped_tail_element(planted):
    _matrix_case("cuda-emu")
    with pytest.raises(AssertionError, match="differs from the reference"):
        _matrix_case(f"cuda-emu-bug{planted}")


@pytest.mark.parametrize("planted", [3], indirect=True)
def test_a_missing_syncthreads_before_the_shared_tables_are_read(planted, monkeypatch):
    # the int8 kernel copies the code tables to shared memory, then every warp reads them to
    # decode, absmax and re-encode its block: without the barrier, thread 0 reads entries the
    # other threads have not copied yet
    maps = ("dynamic", "dynamic")
    _int8_case("cuda-emu", maps, monkeypatch)
    with pytest.raises(AssertionError, match="differs|step"):
        _int8_case(f"cuda-emu-bug{planted}", maps, monkeypatch)


@pytest.mark.parametrize("planted", [4], indirect=True)
def test_a_wrong_offset_in_the_warp_shuffle_reduction(planted):
    # the block absmax reduced over lanes 0-15 and 16-31 apart: half the warp quantizes with a
    # smaller absmax than the other half
    _int8_case("cuda-emu")
    with pytest.raises(AssertionError, match="step"):
        _int8_case(f"cuda-emu-bug{planted}")
