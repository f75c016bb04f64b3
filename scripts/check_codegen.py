#!/usr/bin/env python3
"""Static checks on the GPU code nvcc generated (ARCHITECTURE.md sections 2 and 7).

Given built shared libraries or object files holding device code (SASS and embedded PTX) for one
architecture (sm_90 by default), this extracts the PTX with `cuobjdump -ptx` and the SASS with
`cuobjdump -sass` and checks every kernel:

  PTX (every .entry, and every .func body, reported under its own name):
    fma    no floating-point fma/mad (any fma or mad with an .f16/.bf16/.f32/.f64... type: nvcc
           contracted a*b+c, so the bits differ from the reference); integer mad.lo/mad.wide/
           mad.hi are fine
    approx no .approx instruction (div.approx, rcp.approx, rsqrt, ex2, lg2, sin, cos, tanh...)
    ftz    no .ftz modifier (flushes subnormals)
    rn     floating-point div, sqrt and rcp only with .rn (div.full.f32 is a 2-ulp division;
           integer div.u32/div.s64 are fine)
  SASS (every Function):
    local  no local memory: no LDL/STL instruction (register spills, or arrays indexed at run
           time that did not stay in registers)
    fp64   the float32/bf16/fp16-param update kernels (NO_FP64 below) hold no float64 instruction
    load_first  the float64-param update kernels issue a 128-bit data load before their first
           float64 instruction
    ldg128 / stg128  the kernels matched by VECTOR_128 below must contain at least one 128-bit
           global load (LDG.E.128, any suffix) and one 128-bit global store (STG.E.128)
  and that PTX and SASS hold the same set of kernels.

Kernels matched by REPORT_WIDTHS only get their LDG/STG widths printed. Kernels matching no rule
get the fma/approx/ftz/rn/local checks only. SASS is not checked for FFMA: the correctly rounded
division and square root that div.rn/sqrt.rn expand to use FFMA internally, by design.

PTX needs a build that embeds it: nvcc -gencode arch=compute_90,code=[sm_90,compute_90], or
TORCH_CUDA_ARCH_LIST=9.0+PTX for torch's builds (9.0 alone embeds SASS only).

cuobjdump comes from --cuobjdump, $CUOBJDUMP, PATH, or the pip wheel nvidia-cuda-cuobjdump in the
site-packages of --python (or of this interpreter): nvidia/cu13/bin/cuobjdump. `cuobjdump -sass`
runs nvdisasm (wheel nvidia-cuda-nvdisasm, same folder), so that folder is put on its PATH.

Usage: check_codegen.py [--cuobjdump PATH] [--python PY] [--arch sm_90] [--dump DIR] [-v] FILE...
FILE: a .so, .o or .cubin; a .ptx or .sass file is read as cuobjdump's text output instead.
Prints one line per failure (kernel, rule, instruction) and a summary; exits 1 on any failure or
when no kernel was found, 2 when a tool is missing or fails.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (loaded by path from the tests)
from cuobjdump import (Kernel, demangle_all, find_cuobjdump, parse_ptx,  # noqa: E402,F401
                       parse_sass, run_cuobjdump, tool_env)

# ---- which kernels get which extra rule (matched against the demangled name) ---------------------
# The element-wise fp32 and bf16 update kernels: one 16-byte access per array on the vector path,
# so their SASS must hold a 128-bit global load and a 128-bit global store. Names look like
#   void onepass::(anonymous namespace)::adam_kernel<float, false, false, false, false>(...)
#   void onepass::(anonymous namespace)::lowp_kernel<onepass::Bf16, false, true, false, false, 1, 2>(...)
VECTOR_128: List[Tuple[str, "re.Pattern[str]"]] = [
    ("fp32 adam_kernel", re.compile(r"\badam_kernel<float\s*[,>]")),
    ("bf16 adam_kernel", re.compile(r"\badam_kernel<(?:[\w:]+::)?Bf16\s*[,>]")),
    ("fp32 lowp_kernel", re.compile(r"\blowp_kernel<float\s*[,>]")),
    ("bf16 lowp_kernel", re.compile(r"\blowp_kernel<(?:[\w:]+::)?Bf16\s*[,>]")),
]
# The update kernels of float32 / bf16 / fp16 params: their per-step scalars are made once per
# step (on the host, or by step_scalars_kernel), so they must hold no float64 instruction at all
# (rule fp64). The float64-param update kernels must issue a data load before their first float64
# instruction (rule load_first): the scalar work no longer stands between a block's start and its
# loads.
NO_FP64: List[Tuple[str, "re.Pattern[str]"]] = [
    ("float-param update kernel",
     re.compile(r"\b(?:adam|lowp|int8)_kernel<(?:float|(?:[\w:]+::)?Bf16|(?:[\w:]+::)?Fp16)\s*[,>]")),
]
LOAD_FIRST: List[Tuple[str, "re.Pattern[str]"]] = [
    ("fp64 adam_kernel", re.compile(r"\badam_kernel<double\s*[,>]")),
]
# SASS float64 opcodes (DADD, DMUL, DFMA, DSETP, DMNMX, ...; conversions to or from F64; the
# float64 MUFU approximations that double division and square root start from).
_SASS_FP64 = re.compile(r"^(?:D(?:ADD|MUL|FMA|SETP|SET|MNMX)\b|(?:F2F|F2I|I2F)\.[\w.]*F64|MUFU\.\w+64)")

# Kernels whose LDG/STG widths are reported (not required to be 128-bit): one warp per
# quantization block, byte-wide codes.
REPORT_WIDTHS: List[Tuple[str, "re.Pattern[str]"]] = [
    ("int8_kernel", re.compile(r"\bint8_kernel<")),
]

FLOAT_TYPES = {"f16", "f16x2", "bf16", "bf16x2", "f32", "f32x2", "f64", "tf32",
               "e4m3", "e5m2", "e4m3x2", "e5m2x2"}
# LDG/STG width modifiers in SASS; no modifier: 32 bits.
SASS_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


# ---- rules ----------------------------------------------------------------------------------------
def ptx_rules(opcode: str) -> List[str]:
    """The PTX rules an instruction breaks (empty: fine)."""
    parts = opcode.split(".")
    base, mods = parts[0], parts[1:]
    is_float = any(p in FLOAT_TYPES for p in mods)
    broken = []
    if base in ("fma", "mad") and is_float:
        broken.append("fma")
    if "approx" in mods:
        broken.append("approx")
    if "ftz" in mods:
        broken.append("ftz")
    if base in ("div", "sqrt", "rcp") and is_float and "rn" not in mods:
        broken.append("rn")
    return broken


def sass_width(opcode: str) -> Optional[Tuple[str, int]]:
    """("LDG"|"STG", bits) for a global load or store, else None."""
    parts = opcode.split(".")
    if parts[0] not in ("LDG", "STG"):
        return None
    bits = 32
    for p in parts[1:]:
        bits = SASS_WIDTHS.get(p, bits)
    return parts[0], bits


def sass_is_local(opcode: str) -> bool:
    return opcode.split(".")[0] in ("LDL", "STL")


def sass_is_fp64(opcode: str) -> bool:
    return bool(_SASS_FP64.match(opcode))


def widths(k: Kernel) -> Dict[str, "collections.Counter[int]"]:
    w: Dict[str, collections.Counter] = {"LDG": collections.Counter(), "STG": collections.Counter()}
    for ins in k.insts:
        ls = sass_width(ins.opcode)
        if ls:
            w[ls[0]][ls[1]] += 1
    return w


def format_widths(w: Dict[str, "collections.Counter[int]"]) -> str:
    def one(c: "collections.Counter[int]") -> str:
        return ", ".join(f"{b}-bit x{n}" for b, n in sorted(c.items())) or "none"
    return f"LDG {one(w['LDG'])}; STG {one(w['STG'])}"


def matching(rules: Sequence[Tuple[str, "re.Pattern[str]"]], name: str) -> Optional[str]:
    for label, pat in rules:
        if pat.search(name):
            return label
    return None


@dataclass
class Failure:
    kernel: str
    rule: str
    inst: str

    def line(self) -> str:
        return f"FAIL {self.kernel} [{self.rule}] {self.inst}"


def short_name(demangled: str) -> str:
    """The demangled name without the return type and the parameter list."""
    s = demangled
    if s.startswith("void "):
        s = s[5:]
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += s[i] == ")"
            depth -= s[i] == "("
            if depth == 0:
                # "(anonymous namespace)" is never the last parenthesised group
                s = s[:i]
                break
    return s


def check(ptx: List[Kernel], sass: List[Kernel], demangle: Dict[str, str]):
    """Returns (failures, info lines, summary dict)."""
    dm = lambda n: demangle.get(n, n)  # noqa: E731
    failures: List[Failure] = []
    info: List[str] = []
    for k in ptx:
        label = short_name(dm(k.name)) if k.kind == "entry" else f".func {dm(k.name)}"
        for ins in k.insts:
            for rule in ptx_rules(ins.opcode):
                failures.append(Failure(label, rule, ins.text))
    n_vec = 0
    reported: Dict[str, dict] = {}
    for k in sass:
        full = dm(k.name)
        label = short_name(full)
        for ins in k.insts:
            if sass_is_local(ins.opcode):
                failures.append(Failure(label, "local", ins.text))
        if matching(NO_FP64, full):
            for ins in k.insts:
                if sass_is_fp64(ins.opcode):
                    failures.append(Failure(label, "fp64", ins.text))
        if matching(LOAD_FIRST, full):
            first_fp64 = next((j for j, ins in enumerate(k.insts) if sass_is_fp64(ins.opcode)), None)
            first_128 = next((j for j, ins in enumerate(k.insts)
                              if (sass_width(ins.opcode) or ("", 0)) == ("LDG", 128)), None)
            if first_fp64 is not None and (first_128 is None or first_128 > first_fp64):
                failures.append(Failure(label, "load_first", "a float64 instruction before the "
                                        "first 128-bit data load: " + k.insts[first_fp64].text))
        vec = matching(VECTOR_128, full)
        if vec:
            n_vec += 1
            w = widths(k)
            if not w["LDG"][128]:
                failures.append(Failure(label, "ldg128", f"no 128-bit LDG ({vec}): {format_widths(w)}"))
            if not w["STG"][128]:
                failures.append(Failure(label, "stg128", f"no 128-bit STG ({vec}): {format_widths(w)}"))
        rep = matching(REPORT_WIDTHS, full)
        if rep:
            agg = reported.setdefault(rep, {"n": 0, "LDG": collections.Counter(),
                                            "STG": collections.Counter()})
            agg["n"] += 1
            for op, c in widths(k).items():
                agg[op].update(c.keys())  # kernels using each width
    for rep, agg in reported.items():
        def used(c: "collections.Counter[int]") -> str:
            return ", ".join(f"{b}-bit ({n})" for b, n in sorted(c.items())) or "none"
        info.append(f"widths of {agg['n']} {rep}s (kernels using each): LDG {used(agg['LDG'])}; "
                    f"STG {used(agg['STG'])}")
    entries = [k for k in ptx if k.kind == "entry"]
    pset = {k.name for k in entries}
    sset = {k.name for k in sass}
    for n in sorted(pset - sset):
        failures.append(Failure(short_name(dm(n)), "sets", "PTX .entry without a SASS Function"))
    for n in sorted(sset - pset):
        failures.append(Failure(short_name(dm(n)), "sets", "SASS Function without a PTX .entry"))
    summary = {
        "kernels": len(pset | sset),
        "ptx_entries": len(entries),
        "ptx_funcs": sum(k.kind == "func" for k in ptx),
        "sass_functions": len(sass),
        "sets_match": pset == sset,
        "vector_128": n_vec,
    }
    return failures, info, summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help=".so/.o/.cubin (or cuobjdump text: .ptx, .sass)")
    ap.add_argument("--cuobjdump", help="path of cuobjdump")
    ap.add_argument("--python", help="a Python whose site-packages may hold the cuobjdump wheel")
    ap.add_argument("--cxxfilt", default=shutil.which("c++filt") or "c++filt")
    ap.add_argument("--arch", default="sm_90", help="architecture to check ('' for all)")
    ap.add_argument("--dump", help="write the PTX and SASS text to this folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every kernel's widths")
    a = ap.parse_args(argv)

    cuobjdump = None
    ptx_text: List[str] = []
    sass_text: List[str] = []
    for f in a.files:
        if not os.path.isfile(f):
            print(f"check_codegen: no such file: {f}", file=sys.stderr)
            return 2
        if f.endswith(".ptx"):
            ptx_text.append(open(f).read())
            continue
        if f.endswith(".sass"):
            sass_text.append(open(f).read())
            continue
        if cuobjdump is None:
            cuobjdump = find_cuobjdump(a.cuobjdump, a.python)
            if cuobjdump is None:
                print("check_codegen: cuobjdump not found (--cuobjdump, $CUOBJDUMP, PATH, or pip "
                      "install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm into --python's env)",
                      file=sys.stderr)
                return 2
        env = tool_env(cuobjdump, a.python)
        try:
            ptx_text.append(run_cuobjdump(cuobjdump, "ptx", f, a.arch or None, env))
            sass_text.append(run_cuobjdump(cuobjdump, "sass", f, a.arch or None, env))
        except (OSError, RuntimeError) as exc:
            print(f"check_codegen: {exc}", file=sys.stderr)
            return 2
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        with open(os.path.join(a.dump, "code.ptx"), "w") as fh:
            fh.write("\n".join(ptx_text))
        with open(os.path.join(a.dump, "code.sass"), "w") as fh:
            fh.write("\n".join(sass_text))

    ptx = [k for t in ptx_text for k in parse_ptx(t)]
    sass = [k for t in sass_text for k in parse_sass(t)]
    try:
        demangle = demangle_all([k.name for k in ptx + sass], a.cxxfilt)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"check_codegen: demangling failed ({exc}); names stay mangled", file=sys.stderr)
        demangle = {}
    failures, info, s = check(ptx, sass, demangle)

    for f in failures:
        print(f.line())
    for line in info:
        print(f"check_codegen: {line}")
    if a.verbose:
        for k in sass:
            print(f"check_codegen: widths {short_name(demangle.get(k.name, k.name))}: "
                  f"{format_widths(widths(k))}")
    print(f"check_codegen: {s['kernels']} kernels ({a.arch or 'all archs'}): {s['ptx_entries']} PTX "
          f"entries (+{s['ptx_funcs']} .func), {s['sass_functions']} SASS functions; PTX and SASS "
          f"kernel sets {'match' if s['sets_match'] else 'DIFFER'}; {s['vector_128']} kernels "
          f"must use 128-bit LDG/STG")
    if not s["ptx_entries"]:
        print("check_codegen: no PTX found: build with -gencode arch=compute_90,code=[sm_90,compute_90] "
              "(torch: TORCH_CUDA_ARCH_LIST=9.0+PTX)", file=sys.stderr)
    if s["kernels"] == 0:
        print("check_codegen: FAILED: no kernel found", file=sys.stderr)
        return 1
    if failures:
        by_rule = collections.Counter(f.rule for f in failures)
        print(f"check_codegen: FAILED: {len(failures)} failures ("
              + ", ".join(f"{r} {n}" for r, n in sorted(by_rule.items())) + ")")
        return 1
    print("check_codegen: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
