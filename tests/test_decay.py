"""Weight-decay tooling: param_groups, the decay modes, normalized decay and half-life helpers."""
import io
import math

import pytest
import torch
from torch import nn

import onepass
from onepass import reference


class MyRMSNorm(nn.Module):
    """A model's own norm class (as in many model zoos): found by its name, not its type."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.pos = nn.Parameter(torch.zeros(5, 8))
        self.ln = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = MyRMSNorm(8)
        self.fc = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8))
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight  # tied: one tensor, two names


def _names(groups):
    return [[n for n, _ in g["params"]] for g in groups]


def test_param_groups_split_and_report():
    model = Tiny()
    groups, rep = onepass.param_groups(model, 0.1, report=True)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, keep = _names(groups)
    assert decay == ["pos", "fc.weight", "body.0.weight", "body.1.weight"]
    assert set(keep) == {"emb.weight", "ln.weight", "ln.bias", "bn.weight", "bn.bias", "gn.weight",
                         "gn.bias", "rms.scale", "fc.bias", "body.1.bias"}
    assert rep["decay"] == decay and rep["no_decay"] == keep
    assert rep["why"]["rms.scale"] == "norm MyRMSNorm"
    assert rep["why"]["emb.weight"] == "embedding Embedding"
    assert rep["why"]["fc.bias"] == "bias"
    # the tied tensor once, under its first name, and no decay since one owner is an embedding
    assert rep["tied"] == {"emb.weight": ["head.weight"]}
    every = [p for g in groups for _, p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))


def test_param_groups_rules():
    model = Tiny()
    groups = onepass.param_groups(model, 0.1, no_decay=["pos", "body.*"], decay_embeddings=True)
    decay, keep = _names(groups)
    assert decay == ["emb.weight", "fc.weight"]
    assert "pos" in keep and "body.0.weight" in keep and "body.1.weight" in keep
    # by type; and no decay wins for a tied tensor when one of its owners (head) is exempt
    decay, keep = _names(onepass.param_groups(model, 0.1, no_decay=[nn.Linear], decay_embeddings=True))
    assert decay == ["pos"] and "emb.weight" in keep and "fc.weight" in keep
    # a model with nothing to decay gets a single group
    only = onepass.param_groups(nn.LayerNorm(4), 0.1)
    assert len(only) == 1 and only[0]["weight_decay"] == 0.0
    with pytest.raises(TypeError, match="no_decay"):
        onepass.param_groups(model, 0.1, no_decay=[3])
    with pytest.raises(ValueError, match="weight_decay"):
        onepass.param_groups(model, -1.0)


def test_param_groups_torch_biases_and_parametrized_norms():
    # torch's modules whose biases are not named "bias", and a norm whose weight is parametrized
    # (its param then lives in a ParametrizationList, named "...parametrizations.weight.original")
    class Identity(nn.Module):
        def forward(self, x):
            return x

    model = nn.ModuleDict({
        "attn": nn.MultiheadAttention(8, 2, add_bias_kv=True),
        "lstm": nn.LSTM(4, 4, bidirectional=True),
        "ln": nn.LayerNorm(8),
        "wn": nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)),
    })
    nn.utils.parametrize.register_parametrization(model["ln"], "weight", Identity())
    groups, rep = onepass.param_groups(model, 0.1, report=True)
    decay, keep = _names(groups)
    assert set(keep) == {
        "attn.in_proj_bias", "attn.bias_k", "attn.bias_v", "attn.out_proj.bias",
        "lstm.bias_ih_l0", "lstm.bias_hh_l0", "lstm.bias_ih_l0_reverse", "lstm.bias_hh_l0_reverse",
        "ln.bias", "ln.parametrizations.weight.original", "wn.bias"}
    assert rep["why"]["ln.parametrizations.weight.original"].startswith("norm ")
    # weights stay decayed, the parametrized ones (weight_norm's g and v) included
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "lstm.weight_ih_l0",
            "wn.parametrizations.weight.original0", "wn.parametrizations.weight.original1"} <= set(decay)


@pytest.mark.parametrize("opt_cls", [onepass.AdamW, torch.optim.AdamW])
def test_param_groups_feed_optimizers(opt_cls):
    model = Tiny()
    opt = opt_cls(onepass.param_groups(model, 0.1), lr=1e-2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["param_names"] == ["pos", "fc.weight", "body.0.weight", "body.1.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # zero grads: only decay moves a weight, so decayed params shrink and the rest stay put
    for n, p in model.named_parameters():
        if n in ("pos",):
            continue  # zeros stay zeros
        same = torch.equal(p, before[n])
        assert same == (n not in opt.param_groups[0]["param_names"]), n


def _zero_grad_step(opt, p):
    p.grad = torch.zeros_like(p)
    opt.step()


def _decay_scalar(lr, wd):
    return reference.round_scalar(1.0 - lr * wd, torch.float32)


@pytest.mark.parametrize("backend", onepass.available_backends("cpu"))
def test_lr_independent_shrinks_by_wd_lr_over_lr_max(backend):
    # zero grads: m = v = 0 and the step is p * decay - 0, so p's bits show the decay factor
    for lr_max in (1e-3, 1e-1):
        p = nn.Parameter(torch.full((300,), 2.0))
        opt = onepass.AdamW([p], lr=lr_max, weight_decay=0.3, decay_mode="lr_independent", backend=backend)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
        want = torch.full((300,), 2.0)
        for t in range(3):
            lr = lr_max * 0.5 ** t
            _zero_grad_step(opt, p)
            sched.step()
            eff = 0.3 / lr_max  # weight_decay / lr_max in float64, then the decoupled scalar
            want = want * torch.tensor(_decay_scalar(lr, eff), dtype=torch.float32)
            assert torch.equal(p.detach(), want), (lr_max, t)
        # the shrink follows the schedule, not the peak lr: 1 - 0.3 * 0.25 after three steps
        assert abs(float(p.detach()[0]) / 2.0 - (1 - 0.3) * (1 - 0.15) * (1 - 0.075)) < 1e-6


def test_decay_modes_differ_as_defined():
    def run(**kw):
        p = nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        kw.setdefault("weight_decay", 0.1)
        opt = onepass.AdamW([p], lr=1e-2, **kw)
        for t in range(3):
            p.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(t + 1))
            opt.step()
        return p.detach()

    dec = run()
    assert torch.equal(run(decay_mode="decoupled"), dec)
    assert torch.equal(run(decay_mode="coupled"), run(decoupled=False))
    assert torch.equal(run(decay_mode="coupled"), _adam_l2())
    assert not torch.equal(run(decay_mode="coupled"), dec)
    # lr_independent is decoupled with weight_decay / lr_max in weight_decay's place
    assert torch.equal(run(decay_mode="lr_independent", lr_max=0.25), run(weight_decay=0.1 / 0.25))
    assert not torch.equal(run(decay_mode="lr_independent", lr_max=0.25), dec)


def _adam_l2():
    p = nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    opt = onepass.Adam([p], lr=1e-2, weight_decay=0.1)
    for t in range(3):
        p.grad = torch.randn(64, 64, generator=torch.Generator().manual_seed(t + 1))
        opt.step()
    return p.detach()


def test_decay_mode_options_and_errors():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="decay_mode"):
        onepass.AdamW([p], decay_mode="l2")
    with pytest.raises(ValueError, match="contradicts"):
        onepass.AdamW([p], decay_mode="coupled", decoupled=True)
    with pytest.raises(ValueError, match="lr_max"):
        onepass.AdamW([p], lr=0.0, decay_mode="lr_independent")  # no peak to divide by
    assert onepass.Adam([p], weight_decay=0.1).param_groups[0]["decay_mode"] == "coupled"
    assert onepass.Adam([p], decay_mode="lr_independent").param_groups[0]["decoupled"]
    # per group, in either spelling
    q = nn.Parameter(torch.ones(3))
    opt = onepass.AdamW([{"params": [p], "decoupled": False}, {"params": [q], "decay_mode": "lr_independent"}],
                        lr=0.2)
    assert [g["decay_mode"] for g in opt.param_groups] == ["coupled", "lr_independent"]
    assert opt.param_groups[1]["lr_max"] == 0.2  # the group's starting lr is its peak
    # a group edited into a contradiction fails the step before writing anything
    opt.param_groups[0]["decoupled"] = True
    p.grad = torch.ones(3)
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match="contradicts"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state


def test_decay_mode_state_dict_round_trip():
    p = nn.Parameter(torch.ones(5))
    opt = onepass.AdamW([p], lr=0.1, decay_mode="lr_independent", lr_max=0.5)
    p.grad = torch.ones(5)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = onepass.AdamW([p], lr=0.1)
    other.load_state_dict(torch.load(buf))
    assert other.param_groups[0]["decay_mode"] == "lr_independent"
    assert other.param_groups[0]["lr_max"] == 0.5
    # a state dict saved before decay modes (torch's Adam: no decay_mode key) keeps its L2
    old = torch.optim.Adam([nn.Parameter(torch.ones(5))], weight_decay=0.1).state_dict()
    old["param_groups"][0]["decoupled"] = False
    third = onepass.AdamW([p], lr=0.1)
    third.load_state_dict(old)
    assert third.param_groups[0]["decay_mode"] == "coupled"


def test_normalized_weight_decay():
    assert onepass.normalized_weight_decay(0.05, 128, 50000, 200) == pytest.approx(0.05 * math.sqrt(128 / (50000 * 200)))
    # the point of normalizing: 4x the epochs and 4x the batch keep lambda
    assert onepass.normalized_weight_decay(0.05, 512, 50000, 800) == pytest.approx(
        onepass.normalized_weight_decay(0.05, 128, 50000, 200))
    for bad in ((-1, 1, 1, 1), (1, 0, 1, 1), (1, 1, 0, 1), (1, 1, 1, 0)):
        with pytest.raises(ValueError):
            onepass.normalized_weight_decay(*bad)


@pytest.mark.parametrize("lr,wd", [(1e-2, 0.1), (1e-3, 1.0), (0.05, 0.5)])
def test_decay_half_life_matches_zero_grad_training(lr, wd):
    # with zero grads only the decay acts: count the steps until a weight halves
    p = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = onepass.AdamW([p], lr=lr, weight_decay=wd)
    steps = 0
    while float(p.detach()) > 0.5:
        _zero_grad_step(opt, p)
        steps += 1
    h = onepass.decay_half_life(lr, wd)
    assert steps == math.ceil(h)
    assert h == pytest.approx(math.log(2) / (lr * wd), rel=lr * wd)  # the small-decay rule
    assert onepass.decay_half_life(1e-3, 0.0) == math.inf
    with pytest.raises(ValueError):
        onepass.decay_half_life(2.0, 0.5)
