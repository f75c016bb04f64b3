"""The plan's validity rules, fuzzed (run by tests/test_plan_fuzz.py in a subprocess, so that a
segfault fails a test instead of killing the run).

Two worlds, the same params and the same optimizer settings, one on the backend under test and
one on the reference. Between steps, a random change a user can make is applied to both alike:
replace ``.data`` of a param or of a state tensor, ``share_memory_()``, ``resize_`` a state
tensor, move a param to channels_last or another dtype, set grads to None or to views of a
larger tensor, add a param group, change a group's settings. After every step both worlds must
hold the same bits (torch.equal, NaNs as values), or both steps must raise the same error and
leave everything as it was; a raised step ends the episode (its fault stays).

    python -m tests.plan_fuzz BACKEND FIRST_SEED N_SEEDS [STEPS]

prints one line per episode and exits 1 on the first disagreement, naming the seed and the
changes that led to it.
"""
from __future__ import annotations

import os
import random
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import onepass  # noqa: E402
from onepass import _ops  # noqa: E402
from onepass.backends import cuda_emu  # noqa: E402

SHAPES = [(300,), (40, 50), (6, 4, 3, 3), (7,)]


def _make(backend, seed):
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if seed % 3 == 0 else torch.float32
    ps = [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]
    fmt = ("fp32", "bf16", "int8")[seed % 3 if dtype == torch.float32 else (seed // 3) % 3]
    rounding = "kahan" if dtype == torch.bfloat16 and seed % 2 else "nearest"
    opt = onepass.AdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend, state_dtype=fmt,
                        param_rounding=rounding, min_int8_numel=64)
    return {"params": ps, "opt": opt, "extra": []}


def _every_param(w):
    return [p for g in w["opt"].param_groups for p in g["params"]]


def _grads(w, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in _every_param(w):
        if getattr(p, "_no_grad", False):
            p.grad = None
            continue
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if getattr(p, "_grad_view", False):
            # a view into a larger buffer (as a bucketed all-reduce leaves them)
            big = torch.zeros(p.numel() * 2, dtype=p.dtype)
            big[p.numel():] = g.reshape(-1)
            g = big[p.numel():].view(p.shape)
        if p.is_contiguous(memory_format=torch.channels_last) and p.dim() == 4:
            g = g.contiguous(memory_format=torch.channels_last)
        p.grad = g


# ---- the changes: each f(world, r) with r the episode's draws (the same in both worlds) ------
def data_of_param(w, r):
    p = _every_param(w)[r % len(_every_param(w))]
    p.data = p.data.clone()


def data_of_state(w, r):
    st = list(w["opt"].state.values())
    if st:
        s = st[r % len(st)]
        k = sorted(k for k, v in s.items() if isinstance(v, torch.Tensor))[r % 7 % len(s)]
        s[k].data = s[k].data.clone()


def share_memory(w, r):
    for s in w["opt"].state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                v.share_memory_()


def resize_state(w, r):
    st = list(w["opt"].state.values())
    if st:
        v = st[r % len(st)]["exp_avg"]
        v.resize_(max(v.numel() - 1, 0))


def channels_last(w, r):
    p = w["params"][2]
    p.data = p.data.contiguous(memory_format=torch.channels_last)


def param_to_float64(w, r):
    p = w["params"][r % len(w["params"])]
    if p.dtype == torch.float32:
        p.data = p.data.double()


def grads_none(w, r):
    p = _every_param(w)[r % len(_every_param(w))]
    p._no_grad = not getattr(p, "_no_grad", False)


def grads_views(w, r):
    p = _every_param(w)[r % len(_every_param(w))]
    p._grad_view = not getattr(p, "_grad_view", False)


def add_group(w, r):
    torch.manual_seed(77 + len(w["extra"]))
    q = torch.randn(50 + r % 50).requires_grad_()
    w["extra"].append(q)
    w["opt"].add_param_group({"params": [q], "lr": 3e-3, "weight_decay": 0.0})


def settings(w, r):
    g = w["opt"].param_groups[0]
    choice = r % 5
    if choice == 0:
        g["lr"] = g["lr"] * 0.5
    elif choice == 1:
        g["betas"] = (0.8, 0.99)
    elif choice == 2:
        g["weight_decay"] = 0.0
    elif choice == 3:
        g["state_dtype"] = ("fp32", "bf16", "int8")[r % 3]
    elif g["params"][0].dtype == torch.bfloat16:
        g["param_rounding"] = ("nearest", "stochastic", "kahan")[r % 3]


CHANGES = [data_of_param, data_of_state, share_memory, resize_state, channels_last,
           param_to_float64, grads_none, grads_views, add_group, settings]


def _bits(x):
    return x.view(torch.uint8) if x.dtype.itemsize == 1 else x.view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.dtype.itemsize])


def _snapshot(w):
    out = []
    for p in _every_param(w):
        out.append(("param", p.detach().clone()))
        for k, v in sorted(w["opt"].state.get(p, {}).items()):
            if isinstance(v, torch.Tensor):
                held = v.untyped_storage().nbytes() >= (v.storage_offset() + v.numel()) * v.element_size()
                out.append((k, v.detach().clone() if held else v.untyped_storage().nbytes()))
    return out


def _same(a, b):
    if len(a) != len(b):
        return f"{len(a)} tensors vs {len(b)}"
    for (ka, x), (kb, y) in zip(a, b):
        if ka != kb:
            return f"key {ka} vs {kb}"
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"{ka}: a tensor on one side only"
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"{ka}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
            if not torch.equal(_bits(x.contiguous()), _bits(y.contiguous())):
                return f"{ka}: values differ"
        elif x != y:
            return f"{ka}: {x} vs {y}"
    return None


def _step(w):
    before = _snapshot(w)
    try:
        w["opt"].step()
    except Exception as e:  # noqa: BLE001 - compared with the other world's
        left = _same(before, _snapshot(w))
        return (type(e).__name__, str(e).splitlines()[0]), left
    return None, None


def episode(backend, seed, steps):
    rng = random.Random(seed)
    worlds = [_make(backend, seed), _make("reference", seed)]
    log = []
    for s in range(steps):
        if s > 0 and rng.random() < 0.7:
            change, r = rng.choice(CHANGES), rng.randrange(1000)
            log.append(change.__name__)
            for w in worlds:
                change(w, r)
        for w in worlds:
            _grads(w, s)
        (err, left), (ref_err, ref_left) = (_step(w) for w in worlds)
        if left or ref_left:
            return f"a raising step changed its world ({left or ref_left})", log
        if err != ref_err:
            return f"step {s}: {err} vs the reference's {ref_err}", log
        if err is not None:
            return None, log + [f"both raised {err[0]}"]
        why = _same(_snapshot(worlds[0]), _snapshot(worlds[1]))
        if why is not None:
            return f"step {s}: {why}", log
    return None, log


def main(argv):
    backend, first, n = argv[0], int(argv[1]), int(argv[2])
    steps = int(argv[3]) if len(argv) > 3 else 8
    if backend.startswith("cuda-emu"):
        if not _ops.HAS_EXT:
            print("no extension: nothing to fuzz")
            return 0
        cuda_emu.enable()
    for seed in range(first, first + n):
        why, log = episode(backend, seed, steps)
        print(f"seed {seed}: {' -> '.join(log) or 'no change'}", flush=True)
        if why is not None:
            print(f"FAIL {backend} seed {seed}: {why}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
