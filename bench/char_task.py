"""The character-LM task of bench/char_lm.py: the corpus (bench/data/corpus.txt) and its
batches, and the model, a small GPT (CharGPT) in two sizes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "data", "corpus.txt")


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layer: int
    n_head: int
    ctx: int
    batch: int


SIZES = {
    "tiny": Size(d_model=16, n_layer=1, n_head=2, ctx=16, batch=8),
    "small": Size(d_model=112, n_layer=2, n_head=4, ctx=64, batch=8),
}


# --- data ------------------------------------------------------------------------------------------

def load_corpus(path: str | None = None) -> str:
    """The text of ``path`` (default: bench/data/corpus.txt)."""
    with open(path or CORPUS, encoding="ascii") as f:
        return f.read()


def build_vocab(text: str) -> list[str]:
    """The sorted distinct characters of ``text``: index i is token i."""
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def split(tokens: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (train, validation) split: the first 90% trains, the last 10% is held out, so no
    validation window overlaps a training one."""
    n = int(len(tokens) * train_fraction)
    return tokens[:n], tokens[n:]


def random_batch(data: torch.Tensor, ctx: int, batch: int, gen: torch.Generator):
    """(inputs, targets) of ``batch`` windows at random offsets; targets are inputs shifted by one."""
    starts = torch.randint(len(data) - ctx, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(ctx + 1)
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(data: torch.Tensor, ctx: int, batch: int, n_batches: int):
    """``n_batches`` batches of windows at evenly spaced offsets over the whole of ``data``: the
    same for every run, no random numbers drawn."""
    n_windows = n_batches * batch
    last = len(data) - ctx - 1
    if last < 0:
        raise ValueError(f"validation split ({len(data)} tokens) is shorter than one window ({ctx + 1})")
    starts = torch.linspace(0, last, n_windows).round().long()
    idx = starts[:, None] + torch.arange(ctx + 1)
    windows = data[idx]
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch)]


# --- model -----------------------------------------------------------------------------------------

class Linear(nn.Linear):
    """nn.Linear whose bf16/fp16 matmuls on CPU run in fp32.

    CPUs without native bf16 dot products (measured on AVX2-only EPYC: no avx512_bf16) run a bf16
    matmul about 11x slower than fp32, which made a bf16-params step 250 ms instead of 28. A bf16
    GEMM accumulates in fp32 and rounds its output once, which is what this does too: inputs,
    weights, outputs and gradients stay bf16, and only the accumulation order can differ. The
    params, their grads and the optimizer's update are untouched by this.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype in (torch.bfloat16, torch.float16) and w.device.type == "cpu":
            b = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), w.float(), b).to(w.dtype)
        return super().forward(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = Linear(d, 3 * d)
        self.proj = Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = Linear(d, 4 * d)
        self.fc_out = Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        # (b, t, d) -> (b, heads, t, d/heads)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, size: Size):
        super().__init__()
        if size.d_model % size.n_head:
            raise ValueError(f"d_model {size.d_model} is not a multiple of n_head {size.n_head}")
        self.ctx = size.ctx
        self.tok = nn.Embedding(vocab_size, size.d_model)
        self.pos = nn.Embedding(size.ctx, size.d_model)
        self.blocks = nn.ModuleList(Block(size.d_model, size.n_head) for _ in range(size.n_layer))
        self.ln_f = nn.LayerNorm(size.d_model)
        self.head = Linear(size.d_model, vocab_size)
        self._init_weights(size.n_layer)

    def _init_weights(self, n_layer: int) -> None:
        # N(0, 0.02) for matrices and embeddings, zero biases (GPT-2's choice). The two layers that
        # write into the residual stream get std 0.02/sqrt(2*n_layer): the stream sums 2 of them
        # per block, and this keeps its variance at init independent of depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
