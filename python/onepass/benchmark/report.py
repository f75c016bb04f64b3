"""The results as a table and a plot."""
from __future__ import annotations

import math
from typing import Any, Sequence


from .cases import ACCURACY_DECADES, ACCURACY_STEPS, ACCURACY_ZERO_FRACTION, BUSY_WARNING
from .contestants import CONTESTANTS


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _acc_cells(c: dict[str, Any]) -> list[str]:
    a = c.get("accuracy")
    if not a:
        return ["-", "-"]
    if "error" in a:
        return ["error", "error"]
    if not a.get("finite", True):
        return ["non-finite", "non-finite"]
    return [_fmt(a.get("max_abs"), ".1e"), _fmt(a.get("rel"), ".1e")]


def format_table(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """Plain-text table: one row per case x contestant (speed, rounds, memory, accuracy), then the
    ceiling and notes (skips, errors, first steps that were not timed).

    Accepts the dict from ``run_benchmark`` or a list of case dicts (from ``run_case``)."""
    if isinstance(results, dict):
        cases = results.get("cases", [results] if "contestants" in results else [])
        header = _header(results)
    else:
        cases, header = list(results), []
    cols = ["case", "contestant", "ms/step", "n", "x torch-fused", "GB/s", "of ceiling",
            "state B/p", "max|Δ-ref|", "rel err"]
    rows: list[list[str]] = []
    notes: list[tuple[str, str]] = []  # (case, "name skipped: why" / "name ERROR: why")
    for case in cases:
        first_steps: list[str] = []
        for c in case["contestants"]:
            label = c["name"] + (f" [{c['backend']}]" if c.get("backend") else "")
            n = c.get("rounds", len(c.get("ms_all", [])) or None)
            rows.append([case["case"], label, _fmt(c["ms"], ".3f" if c["ms"] < 1000 else ".0f"),
                         str(n) if n else "-",
                         _fmt(c.get("x_torch_fused"), ".3f" if (c.get("x_torch_fused") or 1) < 0.1 else ".2f"),
                         _fmt(c.get("gbps"), ".1f"), _fmt(c.get("frac_ceiling"), ".2f"),
                         _fmt(c.get("state_bytes_per_param"), ".2f"), *_acc_cells(c)])
            warm = c.get("warmup_ms") or []
            if warm and getattr(CONTESTANTS.get(c["name"]), "compiles", False):
                first_steps.append(f"{c['name']} {warm[0] / 1e3:.1f} s")
            a = c.get("accuracy") or {}
            if "error" in a:
                notes.append((case["case"], f"{c['name']} accuracy ERROR: {a['error']}"))
        if first_steps:
            notes.append((case["case"], "first step, with torch.compile, not timed: "
                                        + ", ".join(first_steps)))
        ceil = case["ceiling"]
        rows.append([case["case"], f"(ceiling {ceil['kind']})", _fmt(ceil["ms"], ".3f"),
                     str(len(ceil.get("ms_all", []))) if ceil.get("ms_all") else "", "",
                     _fmt(ceil.get("gbps"), ".1f"), "1.00", "", "", ""])
        notes += [(case["case"], f"{n} skipped: {why}") for n, why in case.get("skipped", {}).items()]
        notes += [(case["case"], f"{n} ERROR: {why}") for n, why in case.get("errors", {}).items()]
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]

    def line(r):
        return "  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(r, widths))).rstrip()

    out = header + [line(cols), line(["-" * w for w in widths])]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        out.append(line(r if r[0] != prev else [""] + r[1:]))
        prev = r[0]
    # A note seen in every case (a skip from the availability probe, an accuracy error) is said
    # once, without the case name.
    texts: list[str] = []
    for case_name, text in notes:
        everywhere = len(cases) > 1 and sum(t == text for _, t in notes) == len(cases)
        t = text if everywhere else f"{case_name}: {text}"
        if t not in texts:
            texts.append(t)
    if texts:
        out += [""] + texts
    if isinstance(results, dict) and results.get("timing_s"):
        t = results["timing_s"]
        parts = [f"probe {t.get('probe', 0):.0f} s", f"accuracy {t.get('accuracy', 0):.0f} s"]
        parts += [f"{c['case']} {c['elapsed_s']:.0f} s" for c in cases if c.get("elapsed_s") is not None]
        out += ["", "took: " + ", ".join(parts)]
    return "\n".join(out)


def _header(results: dict[str, Any]) -> list[str]:
    m, cfg = results.get("machine"), results.get("config")
    if not m or not cfg:
        return []
    commit = (m.get("git_commit") or "no commit")[:12] + ("+dirty" if m.get("git_dirty") else "")
    busy, others = m.get("cpu_busy_before"), m.get("cpu_others_during")
    busy_warning = []
    if (busy or 0) > BUSY_WARNING or (others or 0) > BUSY_WARNING:
        busy_warning = [f"WARNING: other processes used the CPU ({busy or 0:.0%} busy before the run, "
                        f"{others or 0:.0%} of all cores during it): the figures are not reliable"]
    peers = ", ".join(f"{d} {v}" for d, v in (m.get("peers") or {}).items() if v)
    budget = cfg.get("budget_s")
    rounds = (f"median of up to {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up steps"
              + (f"; n = rounds a contestant got (fewer when its steps would exceed {budget:g} s, "
                 f"at least {cfg.get('min_rounds', 1)})" if budget else ""))
    acc = cfg.get("accuracy") or {}
    lines = [
        f"onepass {m.get('onepass') or '(not importable)'} benchmark, {m['date']}, git {commit}",
        f"{cfg['device']}: {m['device_name']}, {m['threads']} threads, torch {m['torch']}, "
        f"{cfg['dtype']} params" + (" (quick)" if cfg.get("quick") else ""),
        rounds,
    ]
    if peers:
        lines.append(f"peers: {peers}")
    lines.append("GB/s = bytes an AdamW step must move / time; x torch-fused > 1 is faster than torch "
                 "fused; state B/p: measured bytes of optimizer state per param")
    if acc.get("steps"):
        lines.append(f"max|Δ-ref|, rel err: the update accumulated over {acc['steps']} steps against "
                     f"torch.optim.AdamW with fp32 state, same fp32 params and grads:")
        lines.append(f"  max abs difference and ‖Δ-ref‖/‖ref‖ (grad magnitudes spanning "
                     f"{acc.get('decades', ACCURACY_DECADES):g} decades in every block, "
                     f"{acc.get('zero_fraction', ACCURACY_ZERO_FRACTION):.0%} zeros each step)")
    return lines + busy_warning + [""]


def _family_color(name: str) -> str:
    for prefix, color in (("onepass", "tab:red"), ("torch-", "tab:blue"), ("optimi", "tab:purple"),
                          ("bitsandbytes", "tab:green"), ("torchao", "tab:orange")):
        if name.startswith(prefix):
            return color
    return "tab:gray"


def plot(results: dict[str, Any], path: str) -> None:
    """PNG with speed, memory and accuracy side by side. Top row, one panel per case: effective GB/s
    per contestant, the ceiling as a dashed line, bars labelled with the ratio to torch fused and
    the rounds timed. Bottom row: measured state bytes per param (first case) and the relative
    error of the accumulated update against torch.optim.AdamW fp32 (log scale). Needs matplotlib
    (imported here, not at load time)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib, which is not installed "
                           "(pip install matplotlib)") from e
    cases = results["cases"]
    ncols = max(len(cases), 2)
    n_max = max([len(c["contestants"]) for c in cases] + [1])
    fig, axes = plt.subplots(2, ncols, figsize=(max(7.0, (0.45 * n_max + 1.6) * ncols), 9.0),
                             squeeze=False)
    for ax, case in zip(axes[0], cases):
        cs = case["contestants"]
        names = [c["name"] for c in cs]
        vals = [c["gbps"] or 0.0 for c in cs]
        bars = ax.bar(range(len(names)), vals, color=[_family_color(n) for n in names])
        for b, c in zip(bars, cs):
            x = c.get("x_torch_fused")
            label = (f"{x:.2f}x" if x is not None and x >= 0.1 else f"{x:.3f}x" if x is not None else "")
            label += f"\nn={c.get('rounds', len(c.get('ms_all', [])))}"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        cg = case["ceiling"].get("gbps")
        if cg:
            ax.axhline(cg, color="k", ls="--", lw=1,
                       label=f"ceiling ({case['ceiling']['kind']}) {cg:.0f} GB/s")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, 1.3 * max(vals + [cg or 0.0, 1e-9]))  # headroom for the legend and labels
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        n_t = case["n_tensors"]
        ax.set_title(f"speed, {case['case']}: {n_t} tensor{'s' if n_t != 1 else ''}, "
                     f"{case['n_params'] / 1e6:.1f}M params", fontsize=9)
        ax.set_ylabel("effective GB/s (label: x torch fused, rounds)")
    for ax in axes[0][len(cases):]:
        ax.axis("off")

    first = cases[0] if cases else {"contestants": [], "case": ""}
    cs = first["contestants"]
    names = [c["name"] for c in cs]
    ax = axes[1][0]
    vals = [c.get("state_bytes_per_param") or 0.0 for c in cs]
    bars = ax.bar(range(len(names)), vals, color=[_family_color(n) for n in names])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.15 * max(vals + [1e-9]))
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("optimizer state, bytes per param")
    ax.set_title(f"memory ({first['case']}): measured state bytes per param", fontsize=9)

    ax = axes[1][1]
    rel = []
    for c in cs:
        a = c.get("accuracy") or {}
        rel.append(a.get("rel") if a.get("finite", True) and "error" not in a else float("inf"))
    finite = [r for r in rel if r is not None and math.isfinite(r) and r > 0]
    lo = min(finite + [1e-8]) / 3
    hi = max(finite + [10.0]) * 30
    heights = [hi / 3 if r is None or not math.isfinite(r) else max(r, lo) for r in rel]
    bars = ax.bar(range(len(names)), heights, bottom=0, color=[_family_color(n) for n in names])
    for b, r in zip(bars, rel):
        text = ("-" if r is None else "fail" if not math.isfinite(r) else "0" if r == 0
                else f"{r:.1e}")
        ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.axhline(1.0, color="k", ls=":", lw=1, label="error as large as the update")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    acc_cfg = (results.get("config") or {}).get("accuracy") or {}
    ax.set_ylabel("‖Δ - Δ_ref‖ / ‖Δ_ref‖")
    ax.set_title(f"accuracy after {acc_cfg.get('steps', ACCURACY_STEPS)} steps vs torch AdamW fp32",
                 fontsize=9)
    for ax in axes[1][2:]:
        ax.axis("off")

    m = results.get("machine", {})
    fig.suptitle(f"AdamW step on {m.get('device_name', '')}, "
                 f"{results.get('config', {}).get('dtype', '')} params, torch {m.get('torch', '')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
