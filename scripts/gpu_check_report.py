"""Helpers for scripts/gpu_check.sh: merge the per-case benchmark JSON files, and print the final
summary from whatever files a (possibly cut-off) run left in its output folder.

    python scripts/gpu_check_report.py merge OUT.json CASE.json... [--commit C] [--missing CASE:WHY]...
                                       [--check-last]
    python scripts/gpu_check_report.py summary DEST

Standard library only, except that the benchmark tables use onepass.benchmark.format_table when
onepass imports (a plain table otherwise). Every part of the summary reads what exists and says
what does not, so it never fails on a partial run.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET


def merge(out: str, parts: list[str], commit: str | None, missing: list[str], check_last: bool) -> int:
    """Write OUT as one benchmark result holding the cases of PARTS in order (as `python -m onepass`
    would have written them in one run). With check_last, exit status 1 when an onepass contestant
    was skipped or failed in the last part, the case just run (the benchmark itself fails only
    for errors during the timed rounds; a contestant that fails its probe is merely "skipped")."""
    merged = None
    bad = []
    for k, path in enumerate(parts):
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError) as exc:
            missing.append(f"{os.path.basename(path)}:unreadable ({exc})")
            continue
        if merged is None:
            merged = {k: v for k, v in res.items() if k != "cases"}
            merged["cases"] = []
        merged["cases"].extend(res.get("cases", []))
        for case in res.get("cases", []) if check_last and k == len(parts) - 1 else []:
            for name, why in {**case.get("skipped", {}), **case.get("errors", {})}.items():
                if name.startswith("onepass"):
                    bad.append(f"{case.get('case')}: {name}: {why}")
    if merged is None:
        merged = {"schema": 1, "cases": []}
    machine = merged.setdefault("machine", {})
    if commit and not machine.get("git_commit"):
        machine["git_commit"] = commit  # the device copy has no usable .git
        machine["git_commit_source"] = "ONEPASS_COMMIT / gpu_check.sh"
    if missing:
        merged["missing_cases"] = missing  # cut off by their time limit, or failed
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")
    os.replace(tmp, out)
    for line in bad:
        print(f"gpu_check: onepass contestant did not run: {line}")
    return 1 if bad else 0


def _plain_table(res: dict) -> str:
    rows = []
    for case in res.get("cases", []):
        for c in case.get("contestants", []):
            rows.append(f"{case.get('case', '?'):6} {c.get('name', '?'):20} {c.get('ms', float('nan')):9.3f} ms"
                        f"  x torch-fused {c.get('x_torch_fused') or float('nan'):.2f}")
        for name, why in case.get("skipped", {}).items():
            rows.append(f"{'':6} {name} skipped: {why}")
    return "\n".join(rows) or "(no cases)"


def _bench(dest: str, name: str) -> None:
    path = os.path.join(dest, name)
    if not os.path.exists(path):
        print(f"{name}: missing (the stage did not reach a case's end)")
        return
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"{name}: unreadable ({exc})")
        return
    try:
        from onepass.benchmark import format_table
        print(format_table(res))
    except Exception as exc:  # noqa: BLE001 - the table is a convenience; the JSON is the record
        print(f"{name}: (plain table; format_table failed: {type(exc).__name__}: {exc})")
        print(_plain_table(res))
    if res.get("missing_cases"):
        print(f"{name}: cases missing: {', '.join(res['missing_cases'])}")


def _junit(dest: str, name: str) -> None:
    path = os.path.join(dest, name)
    if not os.path.exists(path):
        print(f"{name}: missing (pytest did not finish, was killed, or the stage did not run)")
        return
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"{name}: unreadable ({exc})")
        return
    cases = list(root.iter("testcase"))
    n = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "interrupted": 0}
    failed, times = [], []
    for tc in cases:
        nid = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        times.append((float(tc.get("time") or 0.0), nid))
        kinds = {child.tag for child in tc}
        if not tc.get("name"):  # pytest writes the test a KeyboardInterrupt stopped as a bare <testcase/>
            n["interrupted"] += 1
        elif "failure" in kinds:
            n["failed"] += 1
            failed.append(nid)
        elif "error" in kinds:
            n["error"] += 1
            failed.append(nid + " (error)")
        elif "skipped" in kinds:
            n["skipped"] += 1
        else:
            n["passed"] += 1
    total = sum(float(s.get("time") or 0.0) for s in root.iter("testsuite"))
    print(f"{name}: {n['passed']} passed, {n['failed']} failed, {n['error']} errors, "
          f"{n['skipped']} skipped in {total:.1f} s"
          + ("; INTERRUPTED (time limit): the tests after it did not run" if n["interrupted"] else ""))
    for nid in failed[:20]:
        print(f"  FAILED {nid}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more")
    slow = sorted(times, reverse=True)[:5]
    if slow and slow[0][0] > 0:
        print("  slowest: " + "; ".join(f"{t:.1f} s {nid.rsplit('.', 1)[-1]}" for t, nid in slow))


def summary(dest: str) -> int:
    for name in ("bench_cuda.json", "bench_cpu.json"):
        _bench(dest, name)
        print()
    for name in ("junit_gpu.xml", "junit_long.xml"):
        _junit(dest, name)
    print()
    path = os.path.join(dest, "stages.json")
    try:
        with open(path) as f:
            st = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"stages.json: unreadable ({exc})")
        return 1
    m = st.get("machine", {})
    print(f"{m.get('gpu', '?')} | torch {m.get('torch', '?')} | triton {m.get('triton', '?')} | "
          f"commit {st.get('commit', '?')}")
    print(f"{'stage':12} {'status':8} {'rc':>4} {'seconds':>8} {'limit':>6} {'budget':>6}")
    for s in st.get("stages", []):
        print(f"{s['name']:12} {s['status']:8} {str(s.get('rc') if s.get('rc') is not None else '-'):>4} {s.get('seconds', 0):>8} "
              f"{s.get('limit_s', 0):>6} {s.get('budget_s', 0):>6}")
    print(f"total {st.get('elapsed_s', '?')} s of {st.get('total_budget_s', '?')} s")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "summary":
        return summary(argv[1])
    if len(argv) >= 2 and argv[0] == "merge":
        out, rest = argv[1], argv[2:]
        parts, missing, commit, check_last = [], [], None, False
        i = 0
        while i < len(rest):
            if rest[i] == "--commit":
                commit, i = rest[i + 1], i + 2
            elif rest[i] == "--check-last":
                check_last, i = True, i + 1
            elif rest[i] == "--missing":
                missing.append(rest[i + 1])
                i += 2
            else:
                parts.append(rest[i])
                i += 1
        return merge(out, parts, commit, missing, check_last)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
