"""onepass.AdamW under DistributedDataParallel, alone and as ZeroRedundancyOptimizer's inner
optimizer: 2 gloo processes on CPU, each on its own half of every batch.

DDP's all-reduced gradient need not have the bits of a one-process full-batch backward (another
summation order), so the single-process reference is fed the gradients DDP actually produced:
the test then checks exactly what onepass contributes, that a step on every rank is the same
deterministic function of (params, all-reduced grads, state) as onepass's reference backend.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import onepass

from ._common import HP, assert_params_equal, batch, make_net, reference_run, run_job

pytestmark = pytest.mark.distributed

STEPS = 4
FORMATS = ("fp32", "int8")


def _train(rank, world, fmt, zero):
    # imported here: torch.distributed.optim takes seconds to import (it scripts functional
    # optimizers), which only this job's processes need to pay
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = make_net()
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    ddp = DDP(net)
    if zero:
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=onepass.AdamW, **HP,
                                      state_dtype=fmt)
        owned = sum(len(g["params"]) for g in opt.optim.param_groups)
    else:
        opt = onepass.AdamW(ddp.parameters(), **HP, state_dtype=fmt)
        owned = None
    grads = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        ddp(batch(step).chunk(world)[rank]).backward()  # this rank's shard of the batch
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        opt.step()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    return init, grads, params, owned


def _worker(rank, world, out_dir):
    result = {}
    for fmt in FORMATS:
        for zero in (False, True):
            result[fmt, zero] = _train(rank, world, fmt, zero)
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_job(_worker, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_ddp_matches_single_process(runs, fmt):
    (init0, grads0, params0, _), (init1, grads1, params1, _) = runs[0][fmt, False], runs[1][fmt, False]
    assert_params_equal(init1, init0, "initial params of the two ranks")
    # the all-reduce gave both ranks the same grads (else the comparison below proves nothing)
    for g0, g1 in zip(grads0, grads1):
        assert_params_equal(g1, g0, "all-reduced grads")
    assert_params_equal(params1, params0, "rank 1 vs rank 0 after DDP training")
    net, opt = reference_run(init0, grads0, fmt)
    assert_params_equal(params0, dict(net.named_parameters()), "DDP vs a single process")
    # the test ran the format it names: the big weights had int8 state
    want = torch.uint8 if fmt == "int8" else torch.float32
    assert opt.state[net.fc1.weight]["exp_avg"].dtype == want
    assert opt.state[net.gain]["exp_avg"].dtype == want
    # and training moved every param
    for n, p in net.named_parameters():
        assert not torch.equal(p, init0[n]), n


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_redundancy_matches_ddp(runs, fmt):
    for rank in range(2):
        _, grads_ddp, params_ddp, _ = runs[rank][fmt, False]
        _, grads_zero, params_zero, _ = runs[rank][fmt, True]
        for g_ddp, g_zero in zip(grads_ddp, grads_zero):
            assert_params_equal(g_zero, g_ddp, f"rank {rank}: grads with ZeRO vs without")
        assert_params_equal(params_zero, params_ddp, f"rank {rank}: ZeRO + onepass vs DDP + onepass")
    # ZeRO did split the params: each rank's onepass.AdamW stepped only its own part of them
    owned = [runs[rank][fmt, True][3] for rank in range(2)]
    assert all(n > 0 for n in owned) and sum(owned) == len(runs[0][fmt, True][2]), owned
