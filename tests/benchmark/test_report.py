"""onepass.benchmark, fast unit tests (seconds, CPU only, no timing asserted): the arithmetic of
the derived figures on synthetic numbers and the table (onepass.benchmark.report, machine)."""

from __future__ import annotations

import json

import pytest
import torch

from onepass import benchmark as b


def _synthetic_case(with_fused=True):
    contestants = [{"name": "onepass", "ms": 5.0, "bytes_per_step": 100_000_000}]
    if with_fused:
        contestants.append({"name": "torch-fused", "ms": 10.0, "bytes_per_step": 100_000_000})
    contestants.append({"name": "torch-forloop", "ms": 40.0, "bytes_per_step": 100_000_000})
    return {"case": "synthetic", "n_tensors": 2, "n_params": 100_000_000 // 28, "dtype": "fp32",
            "rounds": 3, "warmup": 1,
            "ceiling": {"kind": "mul_", "bytes": 2_000_000_000, "ms": 100.0},
            "contestants": contestants, "skipped": {"optimi": "not installed"},
            "errors": {"bitsandbytes": "RuntimeError: boom"}}


def test_derive_arithmetic():
    case = b.derive(_synthetic_case())
    assert case["ceiling"]["gbps"] == pytest.approx(20.0)  # 2 GB in 0.1 s
    by = {c["name"]: c for c in case["contestants"]}
    assert by["torch-fused"]["gbps"] == pytest.approx(10.0)  # 0.1 GB in 10 ms
    assert by["onepass"]["gbps"] == pytest.approx(20.0)
    assert by["torch-forloop"]["gbps"] == pytest.approx(2.5)
    assert by["onepass"]["frac_ceiling"] == pytest.approx(1.0)
    assert by["torch-fused"]["frac_ceiling"] == pytest.approx(0.5)
    assert by["torch-forloop"]["frac_ceiling"] == pytest.approx(0.125)
    # ratio = time(torch-fused) / time(contestant): > 1 is faster than torch fused.
    assert by["onepass"]["x_torch_fused"] == pytest.approx(2.0)
    assert by["torch-fused"]["x_torch_fused"] == pytest.approx(1.0)
    assert by["torch-forloop"]["x_torch_fused"] == pytest.approx(0.25)
    assert by["onepass"]["bytes_per_param"] == pytest.approx(28.0, rel=1e-6)
    json.dumps(case)  # plain data

    no_ref = b.derive(_synthetic_case(with_fused=False))
    assert all(c["x_torch_fused"] is None for c in no_ref["contestants"])


def test_format_table():
    case = b.derive(_synthetic_case())
    case["contestants"][0].update(rounds=3, warmup_ms=[9000.0, 5.0],
                                  accuracy={"steps": 100, "max_abs": 1.5e-8, "rel": 7e-7,
                                            "finite": True})
    case["contestants"][2].update(accuracy={"steps": 100, "error": "RuntimeError: nope"})
    text = b.format_table([case])
    lines = text.splitlines()
    assert lines[0].split() == ["case", "contestant", "ms/step", "n", "x", "torch-fused", "GB/s", "of",
                                "ceiling", "state", "B/p", "max|Δ-ref|", "rel", "err"]
    row = next(line for line in lines if "onepass" in line)
    assert row.split() == ["synthetic", "onepass", "5.000", "3", "2.00", "20.0", "1.00", "-",
                           "1.5e-08", "7.0e-07"]
    forloop = next(line for line in lines if line.split()[0] == "torch-forloop")
    assert forloop.split() == ["torch-forloop", "40.000", "-", "0.25", "2.5", "0.12", "-", "error",
                               "error"]
    assert any("ceiling mul_" in line and "20.0" in line for line in lines)
    assert "synthetic: optimi skipped: not installed" in text
    assert "synthetic: bitsandbytes ERROR: RuntimeError: boom" in text
    assert "synthetic: torch-forloop accuracy ERROR: RuntimeError: nope" in text
    assert "first step" not in text  # only contestants that compile get the note
    case["contestants"][2].update(name="torchao-8bit", warmup_ms=[71400.0, 3500.0])
    assert ("synthetic: first step, with torch.compile, not timed: torchao-8bit 71.4 s"
            in b.format_table([case]))
    # The full result (with machine info) gets a header; a skip seen in every case is said once.
    result = {"machine": b.machine_info("cpu"),
              "config": {"device": "cpu", "dtype": "fp32", "rounds": 3, "warmup": 1, "quick": True,
                         "budget_s": 10.0, "min_rounds": 3, "accuracy": {"steps": 100}},
              "cases": [case, dict(b.derive(_synthetic_case()), case="other")]}
    full = b.format_table(result)
    assert "torch " + torch.__version__ in full
    assert "\noptimi skipped: not installed" in full
    assert "fewer when its steps would exceed 10 s, at least 3" in full
    assert "over 100 steps against torch.optim.AdamW with fp32 state" in full


def test_machine_info():
    info = b.machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert info["device"] == "cpu" and info["device_name"]
    assert "git_commit" in info and "onepass" in info and info["date"]
    json.dumps(info)
