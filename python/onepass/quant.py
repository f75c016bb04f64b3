"""The 8-bit quantization maps of onepass's int8 optimizer state.

A map is 256 sorted float32 code values in [-1, 1] (signed, for the first moment m) or [0, 1]
(unsigned, for the second moment v); each holds exactly 0 and 1 (and -1 when signed), so zero
state stays exactly zero and a block's largest element is stored exactly. A block of 256 elements
is stored as one byte per element (the index of the nearest code to x / absmax) and its float32
absmax. The midpoints between neighbouring codes, rounded once to float32 here, are the one table
every backend searches (``reference.quantize_blocks``), so the choice of code never depends on a
backend's arithmetic.

The maps were chosen by measurement (bench/quant_maps.py, results in bench/results/quant_maps/):
see ``SIGNED_MAP`` and ``UNSIGNED_MAP`` for the winners and the README for the figures.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from typing import Dict, Tuple

import torch

__all__ = ["MAPS", "SIGNED_MAP", "UNSIGNED_MAP", "code_table", "is_float3", "midpoints", "tables"]


def _dynamic(signed: bool) -> list:
    """A dynamic-exponent map: 7 decades (1e-7 .. 1), each holding a linear grid of points whose
    count doubles per decade towards 1 (1, 2, 4, ... 64 points; twice that when unsigned, which has
    no sign to spend a bit on). Relative resolution is ~coarse for tiny values and ~1.5% near the
    block's absmax, like the blockwise 8-bit optimizers' maps (our own construction)."""
    pos = []
    for j in range(7):
        n = 2 ** j * (1 if signed else 2)
        scale = 10.0 ** (j - 6)  # decade j covers [0.1, 1] * scale
        pos += [scale * (0.1 + 0.9 * (k + 0.5) / n) for k in range(n)]
    pos = sorted(set(pos))
    pos = pos[-(126 if signed else 254):] + [1.0]  # signed: drop the smallest, room for -1..1
    vals = [0.0] + pos + ([-x for x in pos] if signed else [])
    vals = sorted(set(vals))
    while len(vals) < 256:  # fill with midpoints of the widest top gaps (keeps 256 distinct codes)
        gaps = sorted(((vals[i + 1] - vals[i], i) for i in range(len(vals) - 1)), reverse=True)
        i = gaps[0][1]
        vals.insert(i + 1, (vals[i] + vals[i + 1]) / 2)
    return vals


def _power(signed: bool, power: float) -> list:
    """Companding map: codes u**power over a uniform grid u in [0, 1] (power 1 is linear; power 2
    spends more codes near zero, like quantizing sqrt(|x|) linearly)."""
    if signed:
        neg = [-((128 - i) / 128) ** power for i in range(128)]   # -1 .. just below 0
        pos = [(i / 127) ** power for i in range(128)]             # 0 .. 1
        return neg + pos
    return [(i / 255) ** power for i in range(256)]


def _float(signed: bool, frac_bits: int) -> list:
    """A floating-point map: the float32 numbers with ``frac_bits`` fraction bits (the low
    23 - frac_bits bits zero), counted down from 1.0: 255 of them when unsigned, 127 positive and
    128 negative when signed (the spare code goes to the negative side), plus 0. Every value,
    midpoint and the search itself are exact float32 bit patterns, so a kernel can find the
    nearest code by rounding x's bits (no table search) and decode a code with integer ops (no
    table load). Relative spacing 2**-frac_bits in every binade; 3 fraction bits span 2**-16..1
    signed and 2**-32..1 unsigned (v holds squares: it needs twice m's range in binades)."""
    step = 1 << (23 - frac_bits)
    one = 0x3F800000

    def val(k: int) -> float:  # the k-th value below 1.0
        return struct.unpack("<f", struct.pack("<I", one - k * step))[0]

    if signed:
        return [-val(k) for k in range(128)] + [0.0] + [val(k) for k in reversed(range(127))]
    return [0.0] + [val(k) for k in reversed(range(255))]


#: Candidate maps by name (the measured comparison runs them all): name -> (signed, unsigned).
MAPS: Dict[str, Tuple[list, list]] = {
    "dynamic": (_dynamic(True), _dynamic(False)),
    "linear": (_power(True, 1.0), _power(False, 1.0)),
    "power2": (_power(True, 2.0), _power(False, 2.0)),
    "power3": (_power(True, 3.0), _power(False, 3.0)),
    "power4": (_power(True, 4.0), _power(False, 4.0)),
    "float3": (_float(True, 3), _float(False, 3)),
}

#: The maps onepass uses (see the module docstring for how they were chosen).
#: float3: accuracy equal to the dynamic and power4 maps within seed noise (3 seeds, 600 steps:
#: 1.0033 / 1.0023 / 1.0000 of fp32 state's loss), and its codes are found by rounding bits, so
#: the kernels need no table search (bench/results/quant_maps/README.md).
SIGNED_MAP = "float3"
UNSIGNED_MAP = "float3"


def _check(vals: list, signed: bool) -> None:
    assert len(vals) == 256, len(vals)
    assert all(a < b for a, b in zip(vals, vals[1:])), "codes must be strictly increasing"
    assert 0.0 in vals and vals[-1] == 1.0 and (vals[0] == -1.0 if signed else vals[0] == 0.0)


@lru_cache(maxsize=None)
def code_table(name: str, signed: bool) -> torch.Tensor:
    """The 256 codes of map ``name`` as a float32 CPU tensor (each value rounded once)."""
    vals = MAPS[name][0 if signed else 1]
    t = torch.tensor(vals, dtype=torch.float64).to(torch.float32)
    _check(t.tolist(), signed)
    return t


@lru_cache(maxsize=None)
def midpoints(name: str, signed: bool) -> torch.Tensor:
    """The 255 float32 midpoints between neighbouring codes (float64 sum and halving, rounded once
    to float32). A value x picks code q = the number of midpoints < x: ties go to the lower code."""
    c = code_table(name, signed).double()
    mid = ((c[:-1] + c[1:]) * 0.5).to(torch.float32)
    return mid


def tables(device: torch.device | str = "cpu", signed_map: str | None = None,
           unsigned_map: str | None = None) -> torch.Tensor:
    """The four tables a kernel needs, packed in one float32 tensor of 1022 values on ``device``:
    signed codes (256), signed midpoints (255), unsigned codes (256), unsigned midpoints (255).
    The maps default to SIGNED_MAP / UNSIGNED_MAP as they are at the call (the map comparison
    in bench/quant_maps.py sets them)."""
    key = (str(torch.device(device)), signed_map or SIGNED_MAP, unsigned_map or UNSIGNED_MAP)
    # A plain dict in front of the lru_cache: torch.compile reads a tensor found in a dict as a
    # graph input, but it traces through lru_cache into code_table's .tolist() (a graph break in
    # every compiled int8 step, and the tables rebuilt by the graph each time). The first call
    # builds them eagerly (_build_tables).
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = _build_tables(*key)
    return t


_TABLES: dict = {}


@lru_cache(maxsize=None)
def _tables(device: str, signed_map: str, unsigned_map: str) -> torch.Tensor:
    return torch.cat([code_table(signed_map, True), midpoints(signed_map, True),
                      code_table(unsigned_map, False), midpoints(unsigned_map, False)]).to(device)


_build_tables = torch.compiler.disable(_tables)


def is_float3(t: torch.Tensor) -> bool:
    """Whether packed tables ``t`` hold the float3 maps on both sides, which kernels search by
    bits instead of loading tables (the usual case: the cached default tables themselves)."""
    ref = _tables(str(t.device), "float3", "float3")
    if t is ref or (t.data_ptr() == ref.data_ptr() and t.shape == ref.shape):
        return True
    return t.shape == ref.shape and t.dtype == ref.dtype and bool(torch.equal(t, ref))


#: Offsets into the packed tables.
CODE_M, MID_M, CODE_V, MID_V, TABLES_LEN = 0, 256, 511, 767, 1022
