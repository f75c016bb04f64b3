"""The C++ CPU backend: SIMD variants, threading, layouts and the kernel's own input checks.

Bit-exactness against the reference for every dtype and option is in test_matrix.py; these tests
cover what is particular to the CPU kernel.
"""
from __future__ import annotations

import os

import pytest
import torch

import onepass
from onepass import _ops, reference

pytestmark = [
    pytest.mark.cpu_kernel,
    pytest.mark.skipif(not _ops.HAS_EXT, reason=f"the C++ extension is not built: {_ops.EXT_ERROR}"),
]

ALL_ISAS = ["baseline", "avx2", "avx512"]


def _run(backend, dtype=torch.float32, steps=3, shapes=((64, 33), (1000,), (16 * 9 + 5,)), transpose=True, **kw):
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = onepass.AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **kw)
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape[::-1] if (transpose and p.dim() == 2) else p.shape, generator=gen)
            p.grad = (g.t() if (transpose and p.dim() == 2) else g).to(dtype)
        opt.step()
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [opt.state[p][k].clone() for k in sorted(opt.state[p])]
    return out


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_every_simd_variant_gives_the_reference_bits(isa, dtype):
    supported = torch.ops.onepass._cpu_isa_supported()
    if isa not in supported:
        pytest.skip(f"this CPU does not support {isa} (supported: {supported}); it runs where it does")
    before = torch.ops.onepass._cpu_isa()
    torch.ops.onepass._cpu_isa_set(isa)
    try:
        assert torch.ops.onepass._cpu_isa() == isa
        got = _run("cpu", dtype, amsgrad=True)
    finally:
        torch.ops.onepass._cpu_isa_set(before)
    assert _equal(got, _run("reference", dtype, amsgrad=True))


def test_best_isa_is_the_default():
    supported = torch.ops.onepass._cpu_isa_supported()
    assert supported[0] == "baseline"
    capped = os.environ.get("ONEPASS_CPU_ISA")
    want = capped if capped in supported else supported[-1]
    assert torch.ops.onepass._cpu_isa() == want


def test_unsupported_isa_is_a_clear_error():
    with pytest.raises(RuntimeError, match="unknown CPU ISA"):
        torch.ops.onepass._cpu_isa_set("sse9")


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_bits(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 200K elements: several per-thread chunks, split points inside tensors
        got = _run("cpu", shapes=((300, 333), (100_003,)))
    finally:
        torch.set_num_threads(before)
    assert _equal(got, _run("reference", shapes=((300, 333), (100_003,))))


def test_transposed_grad_is_read_in_the_params_order():
    # torch.optim.AdamW(fused=True) on the CPU pairs a transposed grad's storage order with the
    # param's, so it disagrees with torch's own for-loop AdamW (checked here, so that this test
    # notices when torch fixes it); onepass copies such a grad into the param's layout first.
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    g = torch.randn(33, 64, generator=torch.Generator().manual_seed(1)).t()
    results = {}
    for name, make in {
        "torch-fused": lambda p: torch.optim.AdamW([p], lr=0.1, fused=True),
        "torch-forloop": lambda p: torch.optim.AdamW([p], lr=0.1, foreach=False),
        "onepass-cpu": lambda p: onepass.AdamW([p], lr=0.1, backend="cpu"),
        "onepass-reference": lambda p: onepass.AdamW([p], lr=0.1, backend="reference"),
    }.items():
        p = torch.nn.Parameter(w.clone())
        opt = make(p)
        for _ in range(3):
            p.grad = g
            opt.step()
        results[name] = p.detach()
    assert not torch.allclose(results["torch-fused"], results["torch-forloop"], atol=1e-3)
    assert torch.allclose(results["onepass-cpu"], results["torch-forloop"], rtol=1e-5, atol=1e-6)
    assert torch.equal(results["onepass-cpu"], results["onepass-reference"])


def test_non_dense_param_is_updated_in_place():
    # A Parameter that is a strided view of a larger buffer (every other column).
    def run(backend):
        base = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
        p = torch.nn.Parameter(base[:, ::2])
        assert not p.is_contiguous()
        opt = onepass.AdamW([p], lr=1e-2, backend=backend)
        for s in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + s))
            opt.step()
        return [p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()]

    got = run("cpu")
    assert _equal(got, run("reference"))
    assert not torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16"])
def test_params_with_different_step_counts_get_their_own_scalars(state_dtype):
    # (bf16 state: the random streams' keys, hashed once per run of one count, follow the counts
    # too: a, b, d, c have counts 3, 1, 1, 3 on the third step; b, float64, keeps float64 state)
    def run(backend):
        gen = torch.Generator().manual_seed(5)
        a = torch.nn.Parameter(torch.randn(100, generator=gen))
        b = torch.nn.Parameter(torch.randn(50, generator=gen, dtype=torch.float64))
        d = torch.nn.Parameter(torch.randn(40, generator=gen))
        c = torch.nn.Parameter(torch.randn(30, generator=gen))
        ps = (a, b, d, c)
        opt = onepass.AdamW(ps, lr=1e-2, backend=backend, state_dtype=state_dtype)
        # a and c step alone twice, then all four together (and mixed dtypes)
        for s in range(4):
            for p in ps:
                late = p is b or p is d
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) if (s >= 2 or not late) else None
            opt.step()
        return [*(p.detach().clone() for p in ps), *(opt.state[p]["exp_avg"].clone() for p in ps),
                *(opt.state[p]["step"].clone() for p in ps)]

    got = run("cpu")
    assert [float(x) for x in got[8:]] == [4.0, 2.0, 2.0, 4.0]
    assert _equal(got, run("reference"))


def _op_args(n=3, amsgrad=False, **over):
    params = [torch.randn(5) for _ in range(n)]
    args = dict(
        params=params, grads=[torch.randn(5) for _ in range(n)],
        exp_avgs=[torch.zeros(5) for _ in range(n)], exp_avg_sqs=[torch.zeros(5) for _ in range(n)],
        max_exp_avg_sqs=[torch.zeros(5) for _ in range(n)] if amsgrad else [],
        steps=[torch.zeros(()) for _ in range(n)],
    )
    kw = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              amsgrad=amsgrad, maximize=False, decoupled=True, grad_scale=None, found_inf=None)
    args.update(over)
    return args, kw


@pytest.mark.parametrize("entry", ["op", "direct"])
@pytest.mark.parametrize("bad,match", [
    ({"grads": "short"}, "same length"),
    ({"exp_avgs": "float64"}, "must be Float"),
    ({"exp_avg_sqs": "shape"}, "has shape"),
    ({"grads": "bf16"}, "grads\\[2\\] is BFloat16"),
    ({"steps": "fraction"}, "whole number"),
    ({"params": "int"}, "params must be float32"),
])
def test_kernel_rejects_bad_batches_and_writes_nothing(entry, bad, match):
    args, kw = _op_args()
    (key, how), = bad.items()
    if how == "short":
        args[key] = args[key][:-1]
    elif how == "float64":
        args[key][2] = args[key][2].double()
    elif how == "shape":
        args[key][2] = torch.zeros(6)
    elif how == "bf16":
        args[key][2] = args[key][2].bfloat16()
    elif how == "fraction":
        args[key][2] = torch.tensor(1.5)
    elif how == "int":
        args[key][2] = torch.arange(5)
    before = {k: [t.clone() for t in v] for k, v in args.items()}
    fn = torch.ops.onepass.adam_step_ if entry == "op" else _ops._C.adam_step_cpu
    with pytest.raises(RuntimeError, match=match):
        fn(*args.values(), **kw)
    for k, v in args.items():
        assert all(torch.equal(a, b) for a, b in zip(v, before[k])), k


def test_step_scalars_python_and_cpp_agree():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        r = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
        step = int(torch.randint(1, 2**24, (1,), generator=gen))
        if r[5] < 0.3:
            step = int(r[5] * 100) + 1
        lr, b1, b2, eps, wd = r[0] * 0.1, r[1] * 0.999, 0.9 + r[2] * 0.0999, r[3] * 1e-6, r[4]
        for decoupled in (True, False):
            for dtype, f64 in ((torch.float32, False), (torch.float64, True)):
                want = reference.step_scalars(step, lr, b1, b2, eps, wd, decoupled).rounded(dtype).astuple()
                got = tuple(torch.ops.onepass._step_scalars(step, lr, b1, b2, eps, wd, decoupled, f64))
                assert got == want, (step, lr, b1, b2, eps, wd, decoupled, dtype)
