"""Launching 2-process gloo jobs on loopback, and what the distributed tests share.

A job runs ``fn(rank, world, *args)`` in fresh processes (torch.multiprocessing spawn), each
joined to a gloo process group on 127.0.0.1 at a port that was free a moment ago. An exception in
any rank fails the calling test with that rank's traceback; a job that outlives its deadline
(a hang in a collective) is killed and fails the test instead of blocking CI.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from typing import Callable, Dict, List

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import onepass

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed with the gloo backend", allow_module_level=True)

import torch.distributed as dist  # noqa: E402  (after the availability check)

#: Seconds one job may run (normally a few: startup dominates) before it counts as hung.
JOB_TIMEOUT_S = 150
#: Seconds a rank waits in a collective for a peer that died or hangs.
COLLECTIVE_TIMEOUT_S = 60
#: Hyperparameters of every run: lr large enough that a few steps move params visibly.
HP = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple) -> None:
    # One thread per rank: two ranks share this 2-core machine, and oversubscription only slows.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_job(fn: Callable, *args, world: int = 2) -> None:
    """Runs ``fn(rank, world, *args)`` on ``world`` spawned processes; raises with the failing
    rank's traceback, or after JOB_TIMEOUT_S."""
    for attempt in range(3):
        try:
            return _run_once(fn, args, world)
        except mp.ProcessRaisedException as e:
            # The port was free when picked but taken before rank 0 listened on it: retry.
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise


def _run_once(fn: Callable, args: tuple, world: int) -> None:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback, whatever the host name resolves to
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # children inherit the environment they start with
    try:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world,
                                 join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + JOB_TIMEOUT_S
    # join() raises ProcessRaisedException with the child's traceback when a rank fails (and
    # terminates the others); it returns True once all have exited cleanly.
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            pytest.fail(f"distributed job {fn.__name__} did not finish within {JOB_TIMEOUT_S} s (hang?)")


class Net(nn.Module):
    """A tiny model whose shapes exercise the sharded cases:

    - fc1.weight [67, 64]: 4288 elements, int8 state under state_dtype="int8"; 67 rows split
      34 + 33 by FSDP2 (uneven, padded);
    - gain [1, 4160]: int8 state, one row, so FSDP2 leaves rank 1 an empty shard (its absmax
      shard is [0, 17]);
    - fc1.bias, fc2 (5 x 67 weight): fewer than 4096 elements, fp32 state in every format.
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 67)
        self.fc2 = nn.Linear(67, 5)
        self.gain = nn.Parameter(torch.randn(1, 4160) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        z = x @ self.gain.view(65, 64).T  # [B, 65]
        return y.square().mean() + z.square().mean()


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, rows: int = 8) -> torch.Tensor:
    """The input of one step (the same on every process)."""
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(1000 + step))


def grads_for(net: nn.Module, step: int) -> Dict[str, torch.Tensor]:
    """Pre-drawn full gradients of one step by param name (a different scale per step)."""
    gen = torch.Generator().manual_seed(2000 + step)
    return {n: torch.randn(p.shape, generator=gen) * (0.5 + step)
            for n, p in net.named_parameters()}


def reference_run(init: Dict[str, torch.Tensor], grads: List[Dict[str, torch.Tensor]], fmt: str):
    """A single process, plain tensors: onepass's reference backend (the plain-PyTorch
    specification, not the kernel the distributed runs use) from params ``init`` fed ``grads``.
    Returns the net and its optimizer."""
    net = make_net()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(init[n])
    opt = onepass.AdamW(net.parameters(), **HP, state_dtype=fmt, backend="reference")
    for g in grads:
        for n, p in net.named_parameters():
            p.grad = g[n].clone()
        opt.step()
    return net, opt


def assert_params_equal(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), f"{what}: param {n} differs"
