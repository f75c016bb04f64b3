"""onepass.AdamW on FSDP2 (``fully_shard``) params: DTensors sharded on dim 0 over 2 gloo
processes, unevenly (67 rows: 34 + 33; a 1-row param: 1 + 0).

The claim under test: the sharded optimizer is the unsharded one. Fed the same (full) gradients
that FSDP2's reduce-scatter produced, a single process running onepass's reference backend on
plain tensors reaches the same params and the same state, bit for bit, for fp32 state and for
int8 state, whose blocks lie within dim-0 rows so that dim-0 sharding cannot move them.
"""
from __future__ import annotations

import pytest
import torch

import onepass
from onepass.optimizer import torch_state_dict

from ._common import HP, assert_params_equal, batch, make_net, reference_run, run_job

pytestmark = pytest.mark.distributed

STEPS = 3
FORMATS = ("fp32", "int8")
_OTHER = {"fp32": "int8", "int8": "fp32"}


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def _worker(rank, world, out_dir):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    result = {}
    for fmt in FORMATS:
        net = make_net()
        init = {n: p.detach().clone() for n, p in net.named_parameters()}
        fully_shard(net)
        opt = onepass.AdamW(net.parameters(), **HP, state_dtype=fmt)
        grads = []
        for step in range(STEPS):
            opt.zero_grad(set_to_none=True)
            net(batch(step).chunk(world)[rank]).backward()
            grads.append({n: p.grad.full_tensor() for n, p in net.named_parameters()})
            opt.step()
        params = {n: p.full_tensor() for n, p in net.named_parameters()}
        state = {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()}
        # how params and their state were laid out on this rank
        layout = {}
        for n, p in net.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), n
            layout[n] = {"param": (tuple(p.to_local().shape), str(p.placements))}
            for k, v in opt.state[p].items():
                if isinstance(v, DTensor):
                    assert v.device_mesh == p.device_mesh, (n, k)
                    layout[n][k] = (tuple(v.to_local().shape), str(v.placements), tuple(v.shape))
                else:
                    layout[n][k] = None
        # torch_state_dict decodes the moments shard by shard (int8 dequantized)
        names = [n for n, _ in net.named_parameters()]  # state dict ids follow this order
        decoded = {names[i]: {k: _full(v) for k, v in st.items()}
                   for i, st in torch_state_dict(opt)["state"].items()}
        # switching state_dtype mid-run re-encodes the state of every shard at the next step
        opt.param_groups[0]["state_dtype"] = _OTHER[fmt]
        opt.zero_grad(set_to_none=True)
        net(batch(STEPS).chunk(world)[rank]).backward()
        grads.append({n: p.grad.full_tensor() for n, p in net.named_parameters()})
        opt.step()
        switched = ({n: p.full_tensor() for n, p in net.named_parameters()},
                    {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in net.named_parameters()})
        result[fmt] = (init, grads, params, state, layout, decoded, switched)
    # A param sharded on dim 1 (tensor parallel style) would cut int8 blocks where an unsharded
    # run does not: int8 state for it is refused; fp32 state is elementwise and works.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.ones(64, 128), mesh, [Shard(1)]))
    w.grad = distribute_tensor(torch.ones(64, 128), mesh, [Shard(1)])
    try:
        onepass.AdamW([w], state_dtype="int8").step()
        result["shard1_int8_error"] = None
    except ValueError as e:
        result["shard1_int8_error"] = str(e)
    onepass.AdamW([w], state_dtype="fp32").step()
    result["shard1_fp32_moved"] = not torch.equal(w.full_tensor(), torch.ones(64, 128))
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_job(_worker, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fsdp2_matches_single_process(runs, fmt):
    init, grads, params, state = runs[0][fmt][:4]
    net, opt = reference_run(init, grads[:STEPS], fmt)
    assert_params_equal(params, dict(net.named_parameters()), f"FSDP2 ({fmt} state) vs a single process")
    for n, p in net.named_parameters():
        want = opt.state[p]
        assert state[n].keys() == want.keys(), n
        for k in want:
            assert torch.equal(state[n][k], want[k]), f"state {k} of {n} differs"
        assert not torch.equal(p, init[n]), f"{n} did not move"
    if fmt == "int8":
        assert state["fc1.weight"]["exp_avg"].dtype == torch.uint8
        assert state["gain"]["exp_avg_sq"].dtype == torch.uint8


@pytest.mark.parametrize("fmt", FORMATS)
def test_fsdp2_state_is_sharded_like_its_param(runs, fmt):
    """State is DTensors with the param's placements (what DCP's get_optimizer_state_dict
    expects), and an int8 absmax [rows, blocks per row] is sharded on the same dim-0 rows."""
    for rank, (local_rows_fc1, local_rows_gain) in enumerate([(34, 1), (33, 0)]):
        layout = runs[rank][fmt][4]
        assert layout["fc1.weight"]["param"] == ((local_rows_fc1, 64), "(Shard(dim=0),)")
        assert layout["gain"]["param"] == ((local_rows_gain, 4160), "(Shard(dim=0),)")
        for n, lay in layout.items():
            local_shape, placements = lay["param"]
            assert lay["step"] is None  # a plain count, as torch's AdamW keeps it
            for k in ("exp_avg", "exp_avg_sq"):
                assert lay[k][:2] == (local_shape, placements), (rank, n, k, lay[k])
        if fmt == "int8":
            for n, blocks, rows in (("fc1.weight", 1, 67), ("gain", 17, 1)):
                for k in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                    local_rows = layout[n]["param"][0][0]
                    assert layout[n][k] == ((local_rows, blocks), "(Shard(dim=0),)", (rows, blocks)), \
                        (rank, n, k, layout[n][k])


def _assert_state_equal(got, opt, net, what):
    for n, p in net.named_parameters():
        want = opt.state[p]
        assert got[n].keys() == want.keys(), (what, n)
        for k in want:
            assert torch.equal(got[n][k], want[k]), f"{what}: state {k} of {n} differs"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fsdp2_torch_state_dict_and_format_switch(runs, fmt):
    """The DTensor paths of onepass.torch_state_dict (decode) and of a state_dtype change mid-run
    (decode + re-encode per shard) give the bits of the same operations on plain tensors."""
    init, grads, _, _, _, decoded, (params, state) = runs[0][fmt]
    net, opt = reference_run(init, grads[:STEPS], fmt)
    names = [n for n, _ in net.named_parameters()]
    want = {names[i]: st for i, st in torch_state_dict(opt)["state"].items()}
    assert decoded.keys() == want.keys()
    for n in want:
        assert decoded[n].keys() == want[n].keys(), n
        for k in want[n]:
            assert decoded[n][k].dtype != torch.uint8, (n, k)
            assert torch.equal(decoded[n][k], want[n][k]), f"torch_state_dict: {k} of {n} differs"
    opt.param_groups[0]["state_dtype"] = _OTHER[fmt]
    for n, p in net.named_parameters():
        p.grad = grads[STEPS][n].clone()
    opt.step()
    assert_params_equal(params, dict(net.named_parameters()), f"after switching {fmt} -> {_OTHER[fmt]}")
    _assert_state_equal(state, opt, net, f"after switching {fmt} -> {_OTHER[fmt]}")
    assert state["fc1.weight"]["exp_avg"].dtype == (torch.uint8 if _OTHER[fmt] == "int8" else torch.float32)


def test_int8_state_refused_off_dim_0(runs):
    for rank in range(2):
        err = runs[rank]["shard1_int8_error"]
        assert err is not None and "sharded on dim 0" in err, err
        assert runs[rank]["shard1_fp32_moved"]
