"""Smoke tests of examples/: each script runs with --tiny, writes its PNG and prints sane figures.

The four scripts start together (one subprocess each, ~5 s of it importing torch and onepass) and
each test then checks one of them, so the file takes about as long as the slowest script rather
than the sum. Every script ends with a line ``RESULT {json}``, parsed here.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# matplotlib is in the [test] extra (CI checks the plots); where it is missing (e.g. the offline
# GPU machine) the scripts skip their plot (RESULT says "png": null) and these tests still check
# their figures.
try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = {
    "spurious_feature": "spurious_feature.png",
    "binary_addition": "binary_addition.png",
    "decay_half_life": "decay_half_life.png",
    "quantization_friendliness": "quantization_friendliness.png",
}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (returncode, stdout, stderr, out_dir), all four run concurrently."""
    env = dict(os.environ, MPLBACKEND="Agg")
    procs = {}
    for name in SCRIPTS:
        out = tmp_path_factory.mktemp(name)
        procs[name] = (subprocess.Popen([sys.executable, str(EXAMPLES / f"{name}.py"), "--tiny", "--out", str(out)],
                                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out)
    results = {}
    for name, (proc, out) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\n[timed out after {TIMEOUT_S} s]"
        results[name] = (proc.returncode, stdout, stderr, out)
    return results


def _result(runs, name):
    code, stdout, stderr, out = runs[name]
    assert code == 0, f"{name} exited {code}\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, f"{name}: expected one RESULT line, got {len(lines)}"
    res = json.loads(lines[0][len("RESULT "):])
    assert res["example"] == name
    png = out / SCRIPTS[name]
    if HAVE_MPL:
        assert png.is_file(), f"{name} wrote no {png.name} into {out}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert Path(res["png"]) == png
    else:
        assert res["png"] is None and not png.exists()
    return res


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def _acc(x):
    return _finite(x) and 0.0 <= x <= 1.0


def test_spurious_feature(runs):
    res = _result(runs, "spurious_feature")
    rows = res["rows"]
    assert {r["optimizer"] for r in rows} == {"AdamW", "Adam+L2"}
    for r in rows:
        assert _finite(r["w_spur"], r["w_spur_x_scale"], r["w_causal_norm"], r["spurious_share"])
        for k in ("acc_train", "acc_iid", "acc_random", "acc_flipped"):
            assert _acc(r[k]), (k, r)
        # the model learned the training distribution (~89% reachable; chance is 50%)
        assert r["acc_iid"] > 0.8 and r["acc_train"] > 0.8
        # the spurious weight is positive (it agrees with the label 90% of the time in training),
        # so flipping the feature must hurt
        assert r["w_spur"] > 0 and r["acc_flipped"] < r["acc_iid"]
    # lambda = 0: AdamW and Adam+L2 are the same optimizer, so the same weights exactly
    zero = [r for r in rows if r["lambda"] == 0.0]
    assert len(zero) == 2 and zero[0]["w_spur"] == zero[1]["w_spur"]


def test_binary_addition(runs):
    res = _result(runs, "binary_addition")
    # every pair of 4-bit operands whose longer one has 2 or 4 digits / 3 digits
    assert (res["n_train"], res["n_test"], res["n_test_carry3"]) == (204, 48, 28)
    rows = res["rows"]
    assert [r["lambda"] for r in rows] == [0.0, 1.0]
    for r in rows:
        for k in ("train_acc", "test_acc", "test_bit_acc", "test_acc_sum_lt8", "test_acc_sum_ge8"):
            assert _acc(r[k]), (k, r)
        assert _finite(r["weight_norm"]) and r["weight_norm"] > 0
        # exact match on all 5 bits implies each bit: per-bit accuracy is at least the exact one
        assert r["test_bit_acc"] >= r["test_acc"]
        # the two test subsets (20 and 28 sums) average to the whole test accuracy
        assert r["test_acc"] == pytest.approx((20 * r["test_acc_sum_lt8"] + 28 * r["test_acc_sum_ge8"]) / 48,
                                              abs=1e-6)
    assert rows[0]["train_acc"] >= 0.9   # 200 full-batch steps fit the 204 training sums
    # decoupled decay shrinks the weights
    assert rows[1]["weight_norm"] < rows[0]["weight_norm"]


def test_decay_half_life(runs):
    res = _result(runs, "decay_half_life")
    rows = res["rows"]
    assert len(rows) >= 4
    for r in rows:
        exact = math.log(0.5) / math.log1p(-r["lr"] * r["weight_decay"])
        assert r["exact"] == pytest.approx(exact, rel=1e-12)
        assert r["approx"] == pytest.approx(math.log(2) / (r["lr"] * r["weight_decay"]), rel=1e-12)
        for k in ("measured_f64", "measured_f32"):
            # a whole number of steps: the exact value rounded up, so within 1 step of it
            assert isinstance(r[k], int) and 0 <= r[k] - exact < 1, (k, r)
        assert r["measured_f64_spread"] == 0   # a multiplicative decay halves every weight together
    if getattr(pytest.importorskip("onepass"), "decay_half_life", None) is not None:
        assert res["formula"] == "onepass.decay_half_life"


def test_decay_half_life_formulas():
    """The script's local formulas, and the library's when it has one, agree on known values."""
    spec = importlib.util.spec_from_file_location("decay_half_life_example", EXAMPLES / "decay_half_life.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))  # as when run as a script: its folder holds _common.py
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(EXAMPLES))
    assert mod.decay_half_life_local(0.5, 1.0) == pytest.approx(1.0)
    assert mod.decay_half_life_local(1e-3, 0.1) == pytest.approx(6931.1252, abs=1e-3)
    assert mod.decay_half_life_local(1e-3, 0.0) == math.inf
    assert mod.decay_half_life_approx(1e-3, 0.1) == pytest.approx(6931.4718, abs=1e-3)
    for lr, wd in ((1e-3, 0.1), (0.1, 1.0), (3e-4, 1.0)):
        assert mod.decay_half_life(lr, wd) == pytest.approx(mod.decay_half_life_local(lr, wd), rel=1e-12)


def test_quantization_friendliness(runs):
    res = _result(runs, "quantization_friendliness")
    assert res["same_at_lambda0"] is True
    rows = res["rows"]
    assert {r["optimizer"] for r in rows} == {"AdamW", "Adam+L2"}
    for r in rows:
        for k in ("acc_train", "acc", "acc_int8", "acc_int4"):
            assert _acc(r[k]), (k, r)
        assert r["drop_int8"] == pytest.approx(r["acc"] - r["acc_int8"])
        assert r["acc"] > 0.3   # 10 classes: chance is ~0.1
        assert len(r["layers"]) == 3
        for ly in r["layers"]:
            # each element is off by at most half a step s/2 = absmax/254, so
            # |W - Q(W)| / |W| <= (absmax/rms) / 254; int4 (7 levels a side) is coarser than int8
            assert _finite(ly["rel_err_int8"], ly["rel_err_int4"], ly["absmax_over_rms"])
            assert 0 < ly["rel_err_int8"] <= ly["absmax_over_rms"] / 254 * (1 + 1e-5)
            assert ly["rel_err_int8"] < ly["rel_err_int4"] <= ly["absmax_over_rms"] / 14 * (1 + 1e-5)
