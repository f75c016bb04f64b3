#!/usr/bin/env python3
"""Compiles every Triton kernel variant the triton backend launches for sm_90, without a GPU, and
checks its PTX with scripts/check_codegen.py's PTX rules (no float fma/mad, no .approx, no .ftz,
div/sqrt/rcp only .rn: the bits of the reference).

The CPU tests run these kernels under Triton's interpreter, which never compiles them: a kernel
that does not lower to PTX, or that lowers to contracted or approximate arithmetic, would show
only on the first GPU. The variants are the ones the backend really asks for: it runs a set of
optimizer settings on CPU tensors with its kernels replaced by recorders (nothing is computed),
and each distinct (kernel, argument types, compile-time arguments, options) is compiled with
triton.compile for GPUTarget("cuda", 90, 32), with the statistics' tile sizes of a GPU and each
(BLOCK, num_warps) the first GPU step may tune to.

Needs a CUDA build of torch and its Triton (the venv of scripts/check_cuda_build.sh); the
compiled extension is not needed (the backend's torch-ops tables are used without it).

    python scripts/check_triton_build.py [-v]
Exits 1 on a rule broken or a kernel that fails to compile, 2 when Triton is missing.
"""
from __future__ import annotations

import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
os.environ.pop("TRITON_INTERPRET", None)  # (the kernels must be JIT functions, not interpreted)

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # pragma: no cover - depends on the venv
    print(f"check_triton_build: triton is not installed ({exc})", file=sys.stderr)
    sys.exit(2)

import importlib.util  # noqa: E402

import torch  # noqa: E402

from check_codegen import ptx_rules  # noqa: E402
from cuobjdump import parse_ptx  # noqa: E402

# triton_kernels/ is installed as onepass.triton_kernels (pyproject.toml's package-dir): map it
# so that this runs from the source tree without an install.
_spec = importlib.util.spec_from_file_location(
    "onepass.triton_kernels", os.path.join(HERE, "..", "triton_kernels", "__init__.py"),
    submodule_search_locations=[os.path.join(HERE, "..", "triton_kernels")])
sys.modules["onepass.triton_kernels"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["onepass.triton_kernels"])

TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
          torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
          torch.int8: "i8"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


class _Recorder:
    """Stands for one @triton.jit kernel: ``kernel[grid](...)`` records its arguments."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


def _variant(fn, args, kwargs):
    """(signature, constexprs, options) of one launch of JIT function ``fn``."""
    names = [p.name for p in fn.params]
    given = dict(zip(names, args))
    given.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    sig, consts = {}, {}
    for p in fn.params:
        value = given[p.name] if p.name in given else p.default
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} = {value!r}")
    return sig, consts, options


def _settings():
    """The optimizer settings whose launches are compiled: every state format, param dtype and
    rounding, and each flag that changes a kernel (amsgrad, maximize, coupled decay, a tensor lr,
    a GradScaler, the statistics)."""
    yield dict(dtype=torch.float32)
    yield dict(dtype=torch.float64)
    yield dict(dtype=torch.float16)
    yield dict(dtype=torch.bfloat16)
    yield dict(dtype=torch.float32, amsgrad=True, maximize=True)
    yield dict(dtype=torch.float32, cls="Adam")  # coupled (L2) decay
    yield dict(dtype=torch.float32, lr=torch.tensor(1e-3))
    yield dict(dtype=torch.float32, scaler=True)
    yield dict(dtype=torch.float32, statistics=True)
    yield dict(dtype=torch.float64, statistics=True)
    for fmt in ("bf16", "int8"):
        yield dict(dtype=torch.float32, state_dtype=fmt)
        yield dict(dtype=torch.float32, state_dtype=fmt, statistics=True, scaler=True)
        for rounding in ("nearest", "stochastic", "kahan"):
            yield dict(dtype=torch.bfloat16, state_dtype=fmt, param_rounding=rounding)
    yield dict(dtype=torch.bfloat16, param_rounding="stochastic", statistics=True)


def _record() -> list:
    """Runs the settings through the triton backend with recorders for kernels; returns the
    launches [(kernel name, args, kwargs)]."""
    import onepass
    from onepass.backends import triton as tb

    kernels = tb._load()  # the JIT functions (imported before TRITON_INTERPRET is set)
    os.environ["TRITON_INTERPRET"] = "1"  # (the backend takes CPU tensors only then)
    calls: list = []
    names = ("adam_kernel", "adam_int8_kernel", "stats_group_kernel", "stats_sum_kernel")
    tb._kernels = type("Recorders", (), {n: _Recorder(n, calls) for n in names})()
    tb.STATS_CHUNKS_INTERPRETED = tb.STATS_CHUNKS  # a GPU's statistics tiles
    try:
        for s in _settings():
            s = dict(s)
            dtype, cls = s.pop("dtype"), getattr(onepass, s.pop("cls", "AdamW"))
            scaler = s.pop("scaler", False)
            gen = torch.Generator().manual_seed(0)
            # 2 x 4096 elements: int8 state (4096 and up) and more than one block
            params = [torch.nn.Parameter(torch.randn(64, 64, generator=gen).to(dtype)),
                      torch.nn.Parameter(torch.randn(4096, generator=gen).to(dtype))]
            opt = cls(params, backend="triton", weight_decay=0.1, **s)
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                if scaler:
                    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
                opt.step()
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        tb._kernels = kernels
    # The first GPU step may tune adam_kernel to any of CONFIGS: each (BLOCK, warps) of the
    # plain fp32 launch too.
    plain = next(c for c in calls if c[0] == "adam_kernel" and not c[2].get("STATS")
                 and not c[2].get("SKIP") and c[2]["P_DTYPE"] == kernels.tl.float32
                 and not c[2].get("STATE_BF16"))
    for block, warps in tb.CONFIGS:
        kw = dict(plain[2], BLOCK=block, num_warps=warps)
        calls.append((plain[0], plain[1], kw))
    return calls


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv
    warnings.simplefilter("ignore")
    from onepass.backends import triton as tb

    kernels = tb._load()
    seen, failures, n = set(), [], 0
    start = time.time()
    for name, args, kwargs in _record():
        fn = getattr(kernels, name)
        sig, consts, options = _variant(fn, args, kwargs)
        key = (name, tuple(sorted(sig.items())), repr(sorted(consts.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        label = f"{name}({', '.join(f'{k}={v}' for k, v in consts.items() if k.isupper())})"
        try:
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                 target=TARGET, options=options)
        except Exception as exc:  # noqa: BLE001 - reported, then the check fails
            failures.append(f"{label}: does not compile: {type(exc).__name__}: {exc}")
            continue
        n += 1
        ptx = out.asm["ptx"]
        bad = [(rule, ins.text) for k in parse_ptx(ptx) for ins in k.insts
               for rule in ptx_rules(ins.opcode)]
        loads = ptx.count("ld.global")
        if not loads:
            bad.append(("load", "no ld.global"))
        failures += [f"{label}: {rule}: {text}" for rule, text in bad]
        if verbose:
            print(f"  {label} {options}: {len(ptx.splitlines())} PTX lines, {loads} ld.global, "
                  f"{len(bad)} broken")
    for line in failures:
        print("check_triton_build: FAIL", line)
    print(f"check_triton_build: {n} of {len(seen)} kernel variants compiled for sm_90 with triton "
          f"{triton.__version__} in {time.time() - start:.0f} s, {len(failures)} failures")
    return 1 if failures or not n else 0


if __name__ == "__main__":
    sys.exit(main())
