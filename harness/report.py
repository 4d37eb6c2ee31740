"""Tables and plots from ``results/<run-id>/cells.jsonl``.

* ``summary.csv`` -- one line per cell: status, memory figures, time statistics,
  gradient agreement, final query loss, and ratios against ``maml`` in the same
  (preset, device, dtype, settings) group.
* ``table.md`` -- the same matrix as a Markdown table.
* ``plots/<run-id>/*.png`` -- peak memory per variant, time per variant, memory
  against time (Pareto view), gradient error; for sweeps, memory and time
  against the swept parameter.

The memory figure used for ratios and plots is ``cuda_peak_alloc_above_base_mib``
on CUDA cells and ``cpu_peak_alloc_mib`` (deterministic live bytes) on CPU cells.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from harness.cells import load_rows
from harness.results import write_text_atomic

COLUMNS = ["variant", "preset", "device", "dtype", "settings", "status", "mem_mib", "mem_figure", "mem_vs_maml",
           "time_median_ms", "time_iqr_ms", "time_min_ms", "time_count", "time_vs_maml",
           "cpu_peak_alloc_mib", "cuda_peak_alloc_mib", "cuda_peak_alloc_above_base_mib", "cuda_peak_reserved_mib",
           "nvml_peak_mib", "w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine", "final_query_loss", "message"]


def settings_str(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((settings or {}).items()))


def mem_figure(row: dict[str, Any]) -> tuple[str, float | None]:
    m = row.get("memory") or {}
    if row.get("device") == "cuda" and m.get("cuda_peak_alloc_above_base_mib") is not None:
        return "cuda_peak_alloc_above_base_mib", m["cuda_peak_alloc_above_base_mib"]
    return "cpu_peak_alloc_mib", m.get("cpu_peak_alloc_mib")


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def flatten(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        m, t, a = r.get("memory") or {}, r.get("time") or {}, r.get("agreement") or {}
        fig, mem = mem_figure(r)
        out.append({
            "variant": r["variant"], "preset": r.get("preset"), "device": r.get("device"), "dtype": r.get("dtype"),
            "settings": settings_str(r.get("settings")), "status": r["status"], "mem_mib": mem, "mem_figure": fig,
            "time_median_ms": t.get("median_ms"), "time_iqr_ms": t.get("iqr_ms"), "time_min_ms": t.get("min_ms"),
            "time_count": t.get("count"),
            **{k: m.get(k) for k in ("cpu_peak_alloc_mib", "cuda_peak_alloc_mib", "cuda_peak_alloc_above_base_mib",
                                     "cuda_peak_reserved_mib", "nvml_peak_mib")},
            **{k: a.get(k) for k in ("w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine")},
            "final_query_loss": r.get("final_query_loss"), "message": r.get("message") or "",
        })
    groups: dict[tuple, dict[str, Any]] = {}
    for f in out:
        if f["variant"] == "maml" and f["status"] == "ok":
            groups[(f["preset"], f["device"], f["dtype"], f["settings"])] = f
    for f in out:
        ref = groups.get((f["preset"], f["device"], f["dtype"], f["settings"]))
        for col, src in (("mem_vs_maml", "mem_mib"), ("time_vs_maml", "time_median_ms")):
            a, b = _num(f.get(src)), _num(ref.get(src)) if ref else None
            f[col] = a / b if (a is not None and b) else None
    return out


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.{digits}g}"
    return str(x)


def summary_csv(flat: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for f in flat:
        w.writerow({k: ("" if f.get(k) is None else f.get(k)) for k in COLUMNS})
    return buf.getvalue()


def table_md(flat: list[dict[str, Any]], title: str) -> str:
    cols = [("variant", "variant"), ("settings", "settings"), ("status", "status"), ("mem_mib", "peak mem MiB"),
            ("mem_vs_maml", "mem / maml"), ("time_median_ms", "median ms"), ("time_iqr_ms", "IQR ms"),
            ("time_vs_maml", "time / maml"), ("w_rel_err", "w rel err"), ("lr_rel_err", "lr rel err"),
            ("final_query_loss", "final query loss")]
    figs = sorted({f["mem_figure"] for f in flat})
    presets = sorted({f"{f['preset']} ({f['device']}, {f['dtype']})" for f in flat})
    lines = [f"# {title}", "", f"Preset: {'; '.join(presets)}. Memory figure: {', '.join(figs)}. "
             "Ratios are against `maml` in the same preset/settings.", "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for f in flat:
        cells = []
        for k, _ in cols:
            v = f.get(k)
            cells.append(f"{v:.3f}x" if k.endswith("vs_maml") and v is not None else _fmt(v, 3 if "err" in k else 4))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{f['variant']}` [{f['settings']}]: {f['status']}: {f['message']}" for f in flat if f["message"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def plots_dir_for(run_dir: Path) -> Path:
    """``results/<run-id>`` -> ``plots/<run-id>`` (a ``plots`` folder beside the results root)."""
    run_dir = Path(run_dir)
    return run_dir.parent.parent / "plots" / run_dir.name


def make_plots(rows: list[dict[str, Any]], flat: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = [f for f in flat if f["status"] == "ok"]
    sweep = next((r.get("sweep_param") for r in rows if r.get("sweep_param")), None)
    labels = [f"{f['variant']}" + (f"\n{f['settings']}" if len({g['settings'] for g in ok}) > 1 else "") for f in ok]
    fig_name = ok[0]["mem_figure"] if ok else "memory"

    def save(fig: Any, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    if ok and not sweep:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        ax.bar(range(len(ok)), [f["mem_mib"] or 0 for f in ok], color="tab:blue")
        ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"peak memory (MiB, {fig_name})")
        ax.set_title(f"{title}: peak memory per variant")
        save(fig, "memory.png")

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        ax.bar(range(len(ok)), [f["time_median_ms"] or 0 for f in ok],
               yerr=[(f["time_iqr_ms"] or 0) / 2 for f in ok], color="tab:orange", capsize=3)
        ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("meta-step time, median (ms), bar: IQR")
        ax.set_title(f"{title}: time per variant")
        save(fig, "time.png")

        fig, ax = plt.subplots(figsize=(7, 5))
        pts = [(f["time_median_ms"], f["mem_mib"], f["variant"]) for f in ok
               if f["time_median_ms"] is not None and f["mem_mib"] is not None]
        for t, m, name in pts:
            ax.scatter(t, m, color="tab:blue")
            ax.annotate(name, (t, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("inf")
        for t, m, _ in sorted(pts):
            if m < best:
                front.append((t, m))
                best = m
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.6,
                    label="Pareto front")
            ax.legend()
        ax.set_xlabel("meta-step time, median (ms)")
        ax.set_ylabel(f"peak memory (MiB, {fig_name})")
        ax.set_title(f"{title}: memory vs time")
        save(fig, "pareto.png")

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        floor = 1e-18
        xs = range(len(ok))
        ax.bar([x - 0.2 for x in xs], [max(f["w_rel_err"] or 0, floor) for f in ok], width=0.4, label="weights")
        ax.bar([x + 0.2 for x in xs], [max(f["lr_rel_err"] or 0, floor) if f["lr_rel_err"] is not None else floor
                                       for f in ok], width=0.4, label="LRs")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"meta-gradient rel. error vs reference (floor {floor:g})")
        ax.set_title(f"{title}: gradient error")
        ax.legend()
        save(fig, "grad_error.png")

    if ok and sweep:
        by_variant: dict[str, list[tuple[float, dict]]] = {}
        for r, f in zip(rows, flat):
            if f["status"] == "ok":
                by_variant.setdefault(r["variant"], []).append((float((r.get("settings") or {}).get(sweep, 0)), f))
        for metric, ylabel, name in (("mem_mib", f"peak memory (MiB, {fig_name})", "sweep_memory.png"),
                                     ("time_median_ms", "meta-step time, median (ms)", "sweep_time.png")):
            fig, ax = plt.subplots(figsize=(7, 5))
            for v, pts in by_variant.items():
                pts.sort(key=lambda p: p[0])
                ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], marker="o", label=v)
            ax.set_xlabel(sweep)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {ylabel.split(' (')[0]} vs {sweep}")
            ax.legend(fontsize=8)
            save(fig, name)
    return written


def build(run_dir: Path, *, plots: bool = True, plots_dir: Path | None = None) -> dict[str, Any]:
    """(Re)build summary.csv, table.md and the plots of a run directory."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    flat = flatten(rows)
    title = run_dir.name
    csv_path = write_text_atomic(run_dir / "summary.csv", summary_csv(flat))
    md_path = write_text_atomic(run_dir / "table.md", table_md(flat, title))
    pngs = make_plots(rows, flat, plots_dir or plots_dir_for(run_dir), title) if plots else []
    return {"rows": rows, "flat": flat, "summary": csv_path, "table": md_path, "plots": pngs}


def to_json(flat: list[dict[str, Any]]) -> str:
    return json.dumps(flat, indent=1)
