"""Distributed checkpoints of onepass state (torch.distributed.checkpoint), fp32 and int8:
saved by 2 FSDP2 processes and loaded by 1 plain process, and the reverse. After loading, K more
steps must give the params and state of a run that never stopped, bit for bit.

Every run is fed the same pre-drawn full gradients (``grads_for``): a resumed run and an
uninterrupted one then differ only in what the checkpoint carried. The loading model starts from
other params (seed 1) and its optimizer from DCP's own zero-gradient initialization, so anything
the checkpoint failed to restore shows.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import onepass

from ._common import HP, grads_for, make_net, run_job

pytestmark = pytest.mark.distributed

FORMATS = ("fp32", "int8")
N = 3  # steps before the checkpoint
K = 2  # steps after it


def _set_grads(net, step):
    """The pre-drawn grads of ``step``; on DTensor params, this rank's dim-0 shard of them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for n, g in grads_for(net, step).items():
        p = net.get_parameter(n)
        if isinstance(p, DTensor):
            # src_data_rank=None: every rank holds the full grad and keeps its own chunk
            g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = g


def _train(net, opt, steps):
    for step in steps:
        _set_grads(net, step)
        opt.step()


def _save(net, opt, path):
    with warnings.catch_warnings():  # one process: DCP warns that it assumes no process group
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save({"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)},
                 checkpoint_id=path)


def _load(net, opt, path):
    """The documented DCP round: state dicts shaped by this model and optimizer, filled in place."""
    msd, osd = get_model_state_dict(net), get_optimizer_state_dict(net, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_model_state_dict(net, msd)
    set_optimizer_state_dict(net, opt, osd)


def _snapshot(net, opt):
    """Full params and state by param name (DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    params = {n: full(p) for n, p in net.named_parameters()}
    state = {n: {k: full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
    return params, state


def _sharded(seed, fmt):
    from torch.distributed.fsdp import fully_shard

    net = make_net(seed)
    fully_shard(net)
    return net, onepass.AdamW(net.parameters(), **HP, state_dtype=fmt)


def _plain(seed, fmt):
    net = make_net(seed)
    return net, onepass.AdamW(net.parameters(), **HP, state_dtype=fmt)


def _worker(rank, world, root):
    out = {}
    for fmt in FORMATS:
        # saved by 1 process (before this job), loaded here on 2
        net, opt = _sharded(1, fmt)
        _load(net, opt, f"{root}/from1-{fmt}")
        _train(net, opt, range(N, N + K))
        out["load2", fmt] = _snapshot(net, opt)
        # saved here on 2, loaded by 1 process (after this job); this run continues uninterrupted
        net, opt = _sharded(0, fmt)
        _train(net, opt, range(N))
        _save(net, opt, f"{root}/from2-{fmt}")
        _train(net, opt, range(N, N + K))
        out["uninterrupted2", fmt] = _snapshot(net, opt)
        # full (gathered, unsharded) state dicts, the other common way out of FSDP2, put back
        # into a fresh sharded model: set_optimizer_state_dict re-shards them like the state
        # it finds (the int8 absmax on dim 0 too)
        full = StateDictOptions(full_state_dict=True)
        msd, osd = get_model_state_dict(net, options=full), get_optimizer_state_dict(net, opt, options=full)
        net, opt = _sharded(1, fmt)
        set_model_state_dict(net, msd, options=full)
        set_optimizer_state_dict(net, opt, osd, options=full)
        out["full_sd", fmt] = _snapshot(net, opt)
    if rank == 0:
        torch.save(out, f"{root}/job.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    out = {}
    for fmt in FORMATS:
        net, opt = _plain(0, fmt)
        _train(net, opt, range(N))
        _save(net, opt, str(root / f"from1-{fmt}"))
        _train(net, opt, range(N, N + K))
        out["uninterrupted1", fmt] = _snapshot(net, opt)
    run_job(_worker, str(root))
    out.update(torch.load(root / "job.pt"))
    for fmt in FORMATS:
        net, opt = _plain(1, fmt)
        _load(net, opt, str(root / f"from2-{fmt}"))
        _train(net, opt, range(N, N + K))
        out["load1", fmt] = _snapshot(net, opt)
    return out


def _assert_same_run(got, want, what):
    (p_got, s_got), (p_want, s_want) = got, want
    assert p_got.keys() == p_want.keys()
    for n in p_want:
        assert torch.equal(p_got[n], p_want[n]), f"{what}: param {n} differs"
        assert s_got[n].keys() == s_want[n].keys(), (what, n)
        for k in s_want[n]:
            assert torch.equal(s_got[n][k], s_want[n][k]), f"{what}: state {k} of {n} differs"


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_on_2_load_on_1(runs, fmt):
    _assert_same_run(runs["load1", fmt], runs["uninterrupted2", fmt],
                     f"saved by 2 FSDP2 ranks, resumed by 1 process ({fmt} state)")
    _check_format(runs["load1", fmt], fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_on_1_load_on_2(runs, fmt):
    _assert_same_run(runs["load2", fmt], runs["uninterrupted1", fmt],
                     f"saved by 1 process, resumed by 2 FSDP2 ranks ({fmt} state)")
    _check_format(runs["load2", fmt], fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_and_plain_runs_agree(runs, fmt):
    """What makes the two tests above meaningful across world sizes: the uninterrupted 1- and
    2-process runs, fed the same grads, give the same bits."""
    _assert_same_run(runs["uninterrupted2", fmt], runs["uninterrupted1", fmt],
                     f"2 FSDP2 ranks vs 1 process, no checkpoint ({fmt} state)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_state_dict_round_trip_on_2(runs, fmt):
    _assert_same_run(runs["full_sd", fmt], runs["uninterrupted2", fmt],
                     f"full state dicts out of and back into FSDP2 ({fmt} state)")
    _check_format(runs["full_sd", fmt], fmt)


def _check_format(run, fmt):
    state = run[1]
    want = torch.uint8 if fmt == "int8" else torch.float32
    assert state["fc1.weight"]["exp_avg"].dtype == want
    assert state["gain"]["exp_avg"].dtype == want
    assert state["fc1.bias"]["exp_avg"].dtype == torch.float32  # too small for int8
    assert float(state["fc1.weight"]["step"]) == N + K
