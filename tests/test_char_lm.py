"""Smoke test of bench/char_lm.py, the character-LM accuracy task (a few seconds, CPU only).

bench/ is not a package, so the module is loaded from its file. The real comparison (the "small"
model, thousands of steps, every config) runs by hand: ``python bench/char_lm.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

CHAR_LM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "char_lm.py")


@pytest.fixture(scope="module")
def char_lm():
    spec = importlib.util.spec_from_file_location("char_lm", CHAR_LM)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("char_lm", module)  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Run the tiny model on one thread. Its ops are too small to gain from two, and when another
    process holds the second core every multi-threaded op waits out a scheduler slice for it:
    measured beside a compiler using both cores, one 40-step tiny run took 22 s on two threads
    and under 2 s on one (0.7 s on an idle machine, either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp32_runs(char_lm, one_thread):
    """Two tiny fp32 runs with the same seed, shared by the tests below."""
    kwargs, dtype = char_lm.CONFIGS["fp32"]
    return [char_lm.train(kwargs, 40, size="tiny", seed=0, param_dtype=dtype) for _ in range(2)]


def test_corpus_and_split(char_lm):
    text = char_lm.load_corpus()
    assert 300_000 <= len(text) <= 1_000_000 and text.isascii()
    vocab = char_lm.build_vocab(text)
    tokens = char_lm.encode(text, vocab)
    train, val = char_lm.split(tokens)
    assert len(train) + len(val) == len(tokens) and len(val) == pytest.approx(len(tokens) / 10, abs=1)
    assert torch.equal(torch.cat([train, val]), tokens)  # contiguous: the split is a cut, not a shuffle


def test_tiny_fp32_learns(fp32_runs):
    r = fp32_runs[0]
    assert len(r["train_losses"]) == 40 and r["eval_steps"][0] == 0 and r["eval_steps"][-1] == 40
    assert r["final_eval_loss"] == r["eval_losses"][-1]
    assert math.isfinite(r["final_eval_loss"]) and r["nonfinite_steps"] == 0
    # The first loss is ~ln(96) = 4.56 nats (uniform over the characters); 40 steps bring the
    # validation loss to 3.62 (torch 2.13, CPU). Asking for 0.5 nats leaves room for other torch
    # builds' rounding.
    assert r["train_losses"][0] == pytest.approx(math.log(96), abs=0.1)
    assert r["final_eval_loss"] < r["train_losses"][0] - 0.5


def test_same_seed_same_losses(fp32_runs):
    a, b = fp32_runs
    assert a["train_losses"] == b["train_losses"]  # exact: same init, same batches, no dropout
    assert a["eval_losses"] == b["eval_losses"]


def test_fp32_state_bytes(fp32_runs):
    r = fp32_runs[0]
    # exp_avg and exp_avg_sq in fp32: 2 x 4 bytes per param, the step counters left out.
    assert r["state_bytes"] == 8 * r["n_params"]
    assert r["state_bytes_per_param"] == 8.0


def test_param_groups(char_lm):
    torch.manual_seed(0)
    model = char_lm.CharGPT(96, char_lm.SIZES["tiny"])
    decay, rest = char_lm.param_groups(model)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in rest["params"]}
    assert {"tok.weight", "pos.weight", "ln_f.weight", "head.bias"} <= no_decay
    assert "head.weight" not in no_decay  # untied head: a Linear, so it decays
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_unknown_option_is_unsupported(char_lm):
    with pytest.raises(char_lm.UnsupportedConfig):
        char_lm.train({"no_such_option": 1}, 1, size="tiny")
