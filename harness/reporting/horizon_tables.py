"""The long-horizon run's tables (``horizon RUN memory|time|planner|targets`` blocks in ``docs/checkpointing.md``).

An ``inner_steps`` sweep with several schedules per variant (``make horizon``): peak MiB per K and schedule, the
paired time against the cells' common reference and against ``sckpt_lr``, the planner's cells (budget, plan,
predicted and measured peak) and issue 22's Done-when figures.  ``python -m harness docs`` renders them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from harness.reporting.files import read_cells
from harness.reporting.frame import cells_frame, line_labels, num, setting_text
from harness.reporting.render import fmt, markdown_rows, percent, times
from harness.reporting.schema import ResultsError


def _horizon_frame(root: Path, run: str) -> tuple[pd.DataFrame, list[str]]:
    """The sweep's cells with their K and line label, and the labels in the run's order."""
    rows = read_cells(root / run)
    if any(r.sweep_param != "inner_steps" for r in rows):
        raise ResultsError(f"{root / run}: not an inner_steps sweep")
    frame = cells_frame(rows)
    frame["K"] = [int(r.settings["inner_steps"]) for r in rows]
    frame["label"] = line_labels([r.variant for r in rows], [r.settings for r in rows], "inner_steps")
    frame["budget"] = pd.Series([int(r.settings.get("memory_budget") or 0) for r in rows], dtype=object)
    budgets = dict(zip(frame["label"], frame["budget"]))
    order = ["lr", "sckpt_lr", "bckpt_lr"]  # then the planner's cells by budget, then the peers

    def rank(label: str) -> tuple:
        v = label.split()[0]
        return ":" in v, budgets[label], order.index(v) if v in order else len(order), label
    return frame, sorted(dict.fromkeys(frame["label"]), key=rank)


def _pivot(frame: pd.DataFrame, labels: list[str], cell: Callable[[dict], str]) -> list[str]:
    by = {(f["K"], f["label"]): f for f in frame.to_dict("records")}
    body = [[str(k), *(cell(by[k, lab]) if (k, lab) in by else "—" for lab in labels)]
            for k in sorted(set(frame["K"]))]
    return markdown_rows(["K", *(f"`{lab}`" for lab in labels)], body)


def horizon_table(root: Path, run: str, what: str) -> list[str]:
    frame, labels = _horizon_frame(root, run)
    ok = lambda f: f["status"] == "ok"  # noqa: E731
    if what == "memory":
        return _pivot(frame, labels, lambda f: fmt(f["mem_mib"]) if ok(f) else f["status"])
    if what == "time":  # paired ratios against the common reference (lr), and divided by sckpt_lr's at that K
        sckpt = {f["K"]: f for f in frame.to_dict("records") if f["label"] == "sckpt_lr" and ok(f)}

        def ratio(f: dict) -> str:
            r = num(f["time_vs_ref_paired"])
            if not ok(f) or r is None:
                return f["status"] if not ok(f) else "—"
            base = sckpt.get(f["K"])
            b = num(base["time_vs_ref_paired"]) if base is not None and base["paired_ref"] == f["paired_ref"] else None
            return f"{times(r)} vs `{f['paired_ref']}`" + (f"; {times(r / b)} vs `sckpt_lr`" if b else "")
        return _pivot(frame, labels, ratio)
    if what == "planner":
        body = []
        for f in frame[frame["budget"] > 0].sort_values(["budget", "K"], kind="mergesort").to_dict("records"):
            pred, meas, budget = num(f["predicted_peak_mib"]), num(f["mem_mib"]), f["budget"] / 2 ** 20
            body.append([setting_text("memory_budget", f["budget"]).split("=")[1], str(f["K"]), f["plan"] or f["status"],
                         fmt(pred), fmt(meas), percent(pred / meas - 1, signed=True) if pred and meas else "—",
                         ("yes" if meas <= budget else "**no**") if meas is not None else "—"])
        return markdown_rows(["budget", "K", "plan", "predicted MiB", "measured MiB", "predicted / measured",
                              "within budget"], body)
    if what == "targets":  # issue 22's Done-when figures, from the run
        return horizon_targets(frame)
    raise ResultsError(f"horizon {run} {what}: expected memory, time, planner or targets")


def horizon_targets(frame: pd.DataFrame) -> list[str]:
    """Binomial at the largest K against sckpt_lr's peak (target <= 15%), binomial's growth from K = 64 (<= 2x), the
    planner's predicted against measured peak (within 10% in every cell) and cells over their budget (none)."""
    ok = frame[frame["status"] == "ok"]
    peak = {(f["label"], f["K"]): num(f["mem_mib"]) for f in ok.to_dict("records")}
    top = max((k for lab, k in peak if lab == "bckpt_lr"), default=None)
    rows = []
    if top is not None and ("sckpt_lr", top) in peak:
        r = peak["bckpt_lr", top] / peak["sckpt_lr", top]
        rows.append([f"`bckpt_lr` at K = {top} / `sckpt_lr` at K = {top}", "≤ 15%", percent(r), _holds(r <= 0.15)])
    if top is not None and ("bckpt_lr", 64) in peak:
        g = peak["bckpt_lr", top] / peak["bckpt_lr", 64]
        rows.append([f"`bckpt_lr` growth K = 64 → {top}", "≤ 2×", times(g), _holds(g <= 2)])
    planned = [f for f in ok.to_dict("records") if f["budget"] and num(f["predicted_peak_mib"])]
    if planned:
        worst = max(planned, key=lambda f: abs(f["predicted_peak_mib"] / f["mem_mib"] - 1))
        err = worst["predicted_peak_mib"] / worst["mem_mib"] - 1
        rows.append([f"planner: predicted / measured peak, worst of {len(planned)} cells", "within ±10%",
                     f"{percent(err, signed=True)} ({worst['label']}, K = {worst['K']})", _holds(abs(err) <= 0.10)])
        over = [f for f in planned if f["mem_mib"] > f["budget"] / 2 ** 20]
        rows.append(["planner: cells over their budget", "none", str(len(over)), _holds(not over)])
    budgeted = frame[frame["budget"] > 0]
    failed = budgeted[budgeted["status"] != "ok"]
    if len(failed):
        rows.append(["planner: cells not measured", "none", ", ".join(f"K = {k} {s}" for k, s in
                                                                     zip(failed["K"], failed["status"])), "**no**"])
    return markdown_rows(["target (issue 22)", "target", "measured", "holds"], rows)


def _holds(ok: bool) -> str:
    return "yes" if ok else "**no**"


__all__ = ["horizon_table", "horizon_targets"]
