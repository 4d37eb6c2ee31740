"""``summary.csv`` and ``table.md`` of a run, from ``results/<run-id>/cells.jsonl``.

* ``summary.csv`` -- one line per cell (:data:`COLUMNS`, stable across schema version 1): status, memory
  figures, time statistics, gradient agreement, final query loss, and the ratios of
  :mod:`harness.reporting.frame`.
* ``table.md`` -- the same matrix as a Markdown table; with peer cells (``higher:<v>``, ``torchopt:<v>``)
  a side-by-side section with each of our variants against the best peer; with more than one precision
  (``settings.amp``) a precision section with ratios against fp32.

``python -m harness report RUN`` rebuilds both (and the plots, :mod:`harness.reporting.plots`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness.reporting.frame import (AMP_ORDER, FIDELITY_KEYS, FP32_KEYS, PAIRED_COLUMNS, cells_frame,
                                    computation_key, flatten, num)
from harness.reporting.plots import make_plots
from harness.reporting.paths import plots_dir_for
from harness.reporting.render import fmt, fmt_ratio, markdown_rows, markdown_table, times
from harness.reporting.files import by_identity, read_cells, write_atomic

COLUMNS = ["variant", "preset", "device", "dtype", "settings", "status", "mem_mib", "mem_figure", "mem_vs_maml",
           "time_median_ms", "time_iqr_ms", "time_min_ms", "time_count", "time_vs_maml",
           "cpu_peak_alloc_mib", "cuda_peak_alloc_mib", "cuda_peak_alloc_above_base_mib", "cuda_peak_reserved_mib",
           "nvml_peak_mib", "w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine", "final_query_loss", "message",
           "peer", "base_variant", "amp", "first_order", "learn_lr", "best_peer", "mem_vs_best_peer",
           "time_vs_best_peer", "mem_vs_fp32", "time_vs_fp32", "fp32_w_rel_err", "fp32_w_cosine", "fp32_lr_rel_err",
           "fp32_lr_cosine", *PAIRED_COLUMNS, "model", "tasks", "ckpt", "fd_rel_err"]  # issue 21: appended
PLAN_COLUMNS = ["plan", "predicted_peak_mib"]  # --memory-budget (issue 22): appended when a run has a plan
FIDELITY_COLUMNS = [f"fidelity_{k}" for k in FIDELITY_KEYS]  # issue 23: appended when a cell is an approximation
MATRIX_COLUMNS = {"variant": "variant", "settings": "settings", "status": "status", "mem_mib": "peak mem MiB",
                  "mem_vs_maml": "mem / maml", "time_median_ms": "median ms", "time_iqr_ms": "IQR ms",
                  "time_vs_maml": "time / maml", "time_vs_ref_paired_text": "time / ref (paired, IQR)",
                  "w_rel_err": "w rel err", "lr_rel_err": "lr rel err",
                  "final_query_loss": "final query loss"}
BEST_PEER_LEGEND = (
    "**Best peer**: among the `ok` peer cells (`higher:*`, `torchopt:*`, `torch_maml:*`) that compute the same "
    "meta-gradient as our variant -- same order (`first_order`) and same inner-LR setting (`learn_lr`; checkpointing is not part "
    "of the computation, so `ckpt_lr` is matched with `higher:lr`/`torchopt:lr`), same preset, settings and "
    "precision -- the one with the lowest peak memory (ties: lower median time). `mem / best peer` and "
    "`time / best peer` are our peak memory and median time divided by that one cell's; below 1 means ours "
    "uses less. Unsupported peer cells are listed with their reason.")


def summary_csv(frame: pd.DataFrame) -> str:
    """``summary.csv``: the :data:`COLUMNS` of the flat frame (:func:`cells_frame`), missing empty; the
    :data:`PLAN_COLUMNS` too when a cell has a plan."""
    columns = COLUMNS + (PLAN_COLUMNS if _planned(frame) else []) + (FIDELITY_COLUMNS if _approximate(frame) else [])
    return frame.reindex(columns=columns).to_csv(index=False, lineterminator="\n", na_rep="")


def _planned(frame: pd.DataFrame) -> bool:
    return "plan" in frame and frame["plan"].notna().any()


def _approximate(frame: pd.DataFrame) -> bool:
    """Whether a cell carries a fidelity (an approximate estimator measured against the exact meta-gradient)."""
    return "fidelity_w_rel_err" in frame and frame["fidelity_w_rel_err"].notna().any()


def matrix_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The main table's cells as text: ratios as ``0.406x``, errors to 3 significant digits, others to 4."""
    out = pd.DataFrame(index=frame.index)
    columns = dict(MATRIX_COLUMNS)
    if "fd_rel_err" in frame and frame["fd_rel_err"].notna().any():  # `check`: finite differences
        columns["fd_rel_err"] = "fd rel err"
    if _planned(frame):  # --memory-budget: the plan and its predicted peak beside the measured one
        columns.update({"plan": "plan", "predicted_peak_mib": "predicted peak MiB"})
    if _approximate(frame):  # issue 23: an estimator's error against the exact meta-gradient
        columns.update({"fidelity_w_rel_err": "rel err vs exact", "fidelity_w_cosine": "cosine vs exact",
                        "fidelity_cg_residual": "CG residual"})
    for col, head in columns.items():
        if col.endswith("vs_maml"):
            out[head] = frame[col].map(lambda v: fmt_ratio(v, missing=""))
        else:
            digits = 3 if "err" in col else 6 if "cosine" in col else 4  # a cosine of 0.99999 must not read "1"
            out[head] = frame[col].map(lambda v, d=digits: fmt(v, d))
    return out


def table_md(frame: pd.DataFrame, title: str) -> str:
    """``table.md`` of the flat frame (:func:`cells_frame`): the matrix, notes on failed cells, the peers and
    precision sections when present."""
    flat = frame.to_dict("records")
    figs = sorted(set(frame["mem_figure"]))
    presets = sorted({f"{f['preset']} ({f['device']}, {f['dtype']}" + (f"; {f['user']}" if f.get("user") else "") + ")"
                      for f in flat})
    lines = [f"# {title}", "", f"Preset: {'; '.join(presets)}. Memory figure: {', '.join(figs)}. "
             "Ratios are against `maml` in the same preset/settings."
             + (" On the CPU the memory figure is deterministic (live tensor bytes); the times depend on the "
                "machine's load (noisy on a shared machine) and are no guide to GPU speed."
                if any(f["device"] == "cpu" for f in flat) else ""), "", *markdown_table(matrix_frame(frame))]
    notes = [f"- `{f['variant']}` [{f['settings']}]: {f['status']}: {f['message']}" for f in flat if f["message"]]
    if notes:
        lines += ["", "Notes:", *notes]
    extra = peers_md(flat) + precision_md(flat)
    if extra:
        lines += ["", *extra]
    return "\n".join(lines).rstrip("\n") + "\n"


def _cell_fig(f: dict[str, Any] | None, col: str) -> str:
    if f is None:
        return "—"
    return fmt(f.get(col)) if f["status"] == "ok" else f["status"]


def _peer_cells(pf: dict[str, Any] | None) -> list[str]:
    if pf is None:
        return ["—", "—"]
    ok = pf["status"] == "ok"
    return [_cell_fig(pf, "mem_mib") + (f" (`{pf['variant']}`)" if ok else ""),
            _cell_fig(pf, "time_median_ms") if ok else "—"]


def peers_md(flat: list[dict[str, Any]]) -> list[str]:
    """The side-by-side section: each of our variants, the peer cells of the same computation, the ratios
    against the best peer, and per group our best second-order variant against the best second-order peer."""
    peer_rows = [f for f in flat if f["peer"]]
    if not peer_rows:
        return []
    peers = list(dict.fromkeys(f["peer"] for f in peer_rows))
    multi = len({f["settings"] for f in flat}) > 1
    head = ["our variant", *(["settings"] if multi else []), "order", "inner LR", "ours MiB", "ours ms",
            *[c for p in peers for c in (f"{p} MiB", f"{p} ms")], "best peer", "mem / best peer", "time / best peer"]
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for f in peer_rows:
        if f.get("first_order") is not None:
            by_key.setdefault(computation_key(f), {}).setdefault(f["peer"], f)
    body = []
    for f in (f for f in flat if f["peer"] is None):
        match = by_key.get(computation_key(f), {})
        body.append([f"`{f['variant']}`", *([f["settings"]] if multi else []),
                     "first" if f.get("first_order") else "second", "learned" if f.get("learn_lr") else "fixed",
                     _cell_fig(f, "mem_mib"), _cell_fig(f, "time_median_ms"),
                     *[c for p in peers for c in _peer_cells(match.get(p))],
                     f"`{f['best_peer']}`" if f["best_peer"] else "none supported", fmt_ratio(f["mem_vs_best_peer"]),
                     fmt_ratio(f["time_vs_best_peer"])])
    lines = ["## Ours and the peers side by side", "", BEST_PEER_LEGEND, "", *markdown_rows(head, body), ""]
    return lines + [f"- {line}" for line in second_order_headlines(flat)] + [""]


def second_order_headlines(flat: list[dict[str, Any]]) -> list[str]:
    """Per (preset, device, dtype, settings): our lowest-memory second-order cell vs the lowest-memory
    second-order peer cell (any inner-LR setting), memory ratio (and the time ratio of the same two cells)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in flat:
        if f["status"] == "ok" and f.get("first_order") is False and num(f.get("mem_mib")) is not None:
            groups.setdefault((f["preset"], f["device"], f["dtype"], f["settings"]), []).append(f)
    out = []
    multi = len(groups) > 1
    for (preset, device, dtype, settings), fs in groups.items():
        where = f" [{preset}, {device}" + (f", {settings}" if settings and multi else "") + "]"
        ours = [f for f in fs if f["peer"] is None]
        theirs = [f for f in fs if f["peer"] is not None]
        if not ours or not theirs:
            continue
        a = min(ours, key=lambda f: f["mem_mib"])
        b = min(theirs, key=lambda f: (f["mem_mib"], num(f.get("time_median_ms")) or float("inf")))
        ta, tb = num(a.get("time_median_ms")), num(b.get("time_median_ms"))
        t = ta / tb if ta is not None and tb else None
        out.append(f"**Our best second-order variant vs the best second-order peer**{where}: `{a['variant']}` "
                   f"{fmt(a['mem_mib'])} MiB vs `{b['variant']}` {fmt(b['mem_mib'])} MiB = "
                   f"**{times(a['mem_mib'] / b['mem_mib'], 3)}** memory"
                   + (f" (time {times(t, 3)}, {fmt(a['time_median_ms'])} vs {fmt(b['time_median_ms'])} ms)"
                      if t is not None else ""))
    return out


def precision_md(flat: list[dict[str, Any]]) -> list[str]:
    """Memory and time per variant per precision, ratios against the same cell at fp32 (``off``), and the
    meta-gradient against the fp32 non-checkpointed reference."""
    if {f["amp"] for f in flat} <= {"off"}:
        return []
    order = {a: i for i, a in enumerate(AMP_ORDER)}
    variants = list(dict.fromkeys(f["variant"] for f in flat))
    rows = sorted(flat, key=lambda f: (variants.index(f["variant"]), f["settings_noamp"], order.get(f["amp"], 9)))
    multi = len({f["settings_noamp"] for f in flat}) > 1
    head = ["variant", *(["settings"] if multi else []), "precision", "status", "peak mem MiB", "mem / fp32",
            "median ms", "time / fp32", "w rel err vs fp32 ref", "w cosine", "lr rel err vs fp32 ref", "lr cosine"]
    body = []
    for f in rows:
        err = [f.get(k[5:] if f["amp"] == "off" else k) for k in FP32_KEYS]
        body.append([f"`{f['variant']}`", *([f["settings_noamp"]] if multi else []), f["amp"], f["status"],
                     fmt(f["mem_mib"]), fmt_ratio(f["mem_vs_fp32"]), fmt(f["time_median_ms"]),
                     fmt_ratio(f["time_vs_fp32"]),
                     *(fmt(e, 7 if "cosine" in k else 3) for k, e in zip(FP32_KEYS, err))])
    return ["## Precision", "",
            "Each cell at each precision (`off` = fp32; `bf16`/`fp16` = fp32 weights under autocast). "
            "`mem / fp32` and `time / fp32` divide by the same variant's `off` cell (below 1: a saving). "
            "The error and cosine columns compare the cell's meta-gradients with the fp32 non-checkpointed "
            "reference on the same weights and tasks (`off` rows: the cell's own agreement with it).", "",
            *markdown_rows(head, body), ""]


def build(run_dir: Path, *, plots: bool = True, plots_dir: Path | None = None) -> dict[str, Any]:
    """(Re)build summary.csv, table.md and the plots of a run directory."""
    run_dir = Path(run_dir)
    rows = read_cells(run_dir)
    by_identity(rows, run_dir)  # a duplicated row would show a cell twice
    frame = cells_frame(rows)
    flat = frame.to_dict("records")
    title = run_dir.name
    csv_path = write_atomic(run_dir / "summary.csv", summary_csv(frame))
    md_path = write_atomic(run_dir / "table.md", table_md(frame, title))
    sweep = next((r.sweep_param for r in rows if r.sweep_param), None)
    settings = [r.settings for r in rows]
    pngs = make_plots(flat, settings, sweep, plots_dir or plots_dir_for(run_dir), title) if plots else []
    return {"rows": rows, "flat": flat, "frame": frame, "summary": csv_path, "table": md_path, "plots": pngs}


def to_json(flat: list[dict[str, Any]]) -> str:
    return json.dumps(flat, indent=1)


__all__ = ["flatten", "COLUMNS", "PLAN_COLUMNS", "BEST_PEER_LEGEND", "summary_csv", "matrix_frame", "table_md", "peers_md",
           "second_order_headlines", "precision_md", "build", "to_json"]
