"""cuobjdump for the codegen checks (check_codegen.py, check_triton_build.py): finding it (and
nvdisasm, which `cuobjdump -sass` runs) in PATH or a Python environment's CUDA wheels, running it,
demangling kernel names, and parsing its PTX and SASS listings into kernels and instructions."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional


# ---- listings ------------------------------------------------------------------------------------
@dataclass
class Inst:
    text: str       # the instruction as printed (PTX statement, or SASS with its address)
    opcode: str     # e.g. fma.rn.f32, LDG.E.128.CONSTANT


@dataclass
class Kernel:
    name: str                   # mangled
    kind: str                   # "entry" / "func" (PTX) or "sass"
    insts: List[Inst] = field(default_factory=list)


_PTX_HEAD = re.compile(r"\.(entry|func)\s+(?:\([^)]*\)\s*)?([A-Za-z_$%][\w$%]*)")
_PTX_PRED = re.compile(r"^@!?%?[\w$]+\s+")
_PTX_LABEL = re.compile(r"^[\w$%.]+:\s*")


def _ptx_statements(body: str) -> Iterable[str]:
    for line in body.splitlines():
        line = line.split("//", 1)[0]
        for stmt in line.split(";"):
            stmt = stmt.strip().strip("{}").strip()
            while True:  # labels, possibly several
                m = _PTX_LABEL.match(stmt)
                if not m or stmt.startswith("."):
                    break
                stmt = stmt[m.end():]
            if stmt and not stmt.startswith("."):
                yield stmt


def parse_ptx(text: str) -> List[Kernel]:
    """Every .entry (kind "entry") and .func with a body (kind "func") of cuobjdump -ptx output
    (or of a .ptx file), with its instructions. Declarations (ending in ';') are skipped."""
    # Block comments never hold code; line comments are removed statement by statement.
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    out: List[Kernel] = []
    pos = 0
    while True:
        m = _PTX_HEAD.search(text, pos)
        if not m:
            return out
        kind, name = m.group(1), m.group(2)
        i = m.end()
        # the parameter list, if any
        j = i
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        if j < len(text) and text[j] == "(":
            depth = 0
            while j < len(text):
                depth += text[j] == "("
                depth -= text[j] == ")"
                j += 1
                if depth == 0:
                    break
        # performance directives (.maxntid 256, 1, 1 ...) until '{' (a body) or ';' (a declaration)
        k = j
        while k < len(text) and text[k] not in "{;":
            k += 1
        if k >= len(text) or text[k] == ";":
            pos = k + 1
            continue
        depth, e = 0, k
        while e < len(text):
            depth += text[e] == "{"
            depth -= text[e] == "}"
            e += 1
            if depth == 0:
                break
        kern = Kernel(name, kind)
        for stmt in _ptx_statements(text[k + 1:e - 1]):
            stmt = " ".join(stmt.split())
            opcode = _PTX_PRED.sub("", stmt).split(" ", 1)[0]
            kern.insts.append(Inst(stmt, opcode))
        out.append(kern)
        pos = e


_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INST = re.compile(r"^\s*(/\*[0-9a-fA-F]{4,}\*/)\s+([^;]*?)\s*;")
_SASS_PRED = re.compile(r"^@!?U?P(?:T|\d+)\s+")
_SASS_ARCH = re.compile(r"code for (sm_\w+)")


def parse_sass(text: str) -> List[Kernel]:
    """Every Function of cuobjdump -sass output, with its instructions."""
    out: List[Kernel] = []
    cur: Optional[Kernel] = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            cur = Kernel(m.group(1), "sass")
            out.append(cur)
            continue
        if _SASS_ARCH.search(line) or line.startswith("Fatbin"):
            cur = None
            continue
        m = _SASS_INST.match(line)
        if m and cur is not None:
            ins = " ".join(m.group(2).split())
            opcode = _SASS_PRED.sub("", ins).split(" ", 1)[0]
            cur.insts.append(Inst(f"{m.group(1)} {ins}", opcode))
    return out


# ---- the tools -----------------------------------------------------------------------------------
def _site_bins(python: Optional[str]) -> List[str]:
    """nvidia/*/bin folders of the pip wheels in a Python environment's site-packages."""
    if python:
        try:
            purelib = subprocess.run(
                [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return []
    else:
        import sysconfig
        purelib = sysconfig.get_paths()["purelib"]
    # CUDA 13 wheels: nvidia/cu13/bin; CUDA 12 wheels: nvidia/cuda_cuobjdump/bin
    return sorted(glob.glob(os.path.join(purelib, "nvidia", "*", "bin")), reverse=True)


def find_cuobjdump(explicit: Optional[str] = None, python: Optional[str] = None) -> Optional[str]:
    cands = [explicit, os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for py in ([python] if python else []) + [None]:
        cands += [os.path.join(b, "cuobjdump") for b in _site_bins(py)]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def tool_env(cuobjdump: str, python: Optional[str] = None) -> Dict[str, str]:
    """The environment for cuobjdump: its own folder first on PATH (the wheels put nvdisasm beside
    it), then the wheel folders of --python and of this interpreter, for nvdisasm."""
    env = dict(os.environ)
    dirs = [os.path.dirname(os.path.abspath(cuobjdump))]
    if not os.path.isfile(os.path.join(dirs[0], "nvdisasm")) and not shutil.which("nvdisasm"):
        for py in ([python] if python else []) + [None]:
            dirs += [b for b in _site_bins(py) if os.path.isfile(os.path.join(b, "nvdisasm"))]
    env["PATH"] = os.pathsep.join(dirs + [env.get("PATH", "")])
    return env


def run_cuobjdump(cuobjdump: str, what: str, path: str, arch: Optional[str],
                  env: Optional[Dict[str, str]] = None) -> str:
    cmd = [cuobjdump, f"-{what}"] + (["-arch", arch] if arch else []) + [path]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=env if env is not None else tool_env(cuobjdump))
    if r.returncode != 0:
        if "does not contain device code" in r.stderr + r.stdout:
            return ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[:2000]}")
    return r.stdout


def demangle_all(names: Iterable[str], cxxfilt: str) -> Dict[str, str]:
    names = sorted(set(names))
    if not names:
        return {}
    r = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True,
                       check=True)
    out = r.stdout.splitlines()
    if len(out) != len(names):
        raise RuntimeError("c++filt returned a different number of lines")
    return dict(zip(names, out))
