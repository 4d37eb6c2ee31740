"""The ablation's files: records -> pandas DataFrames -> ablation.csv, effects.csv, checks.csv and table.md.

Written by :func:`harness.studies.ablation.ablate.run_ablation` (``python -m harness ablate``); the
CSVs keep every number at full precision, the markdown rounds for reading.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from harness.reporting.files import write_json, write_atomic
from harness.reporting.render import fixed, fmt, markdown_table
from harness.reporting.schema import AblationSummary
from harness.studies.ablation.plots import plot_curves

__all__ = ["check_line", "check_table", "effect_table", "markdown", "markdown_tables", "variant_table", "write_report"]


def _interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    def f(v: float) -> str:
        return fixed(v, 4, signed=signed)
    return f"{f(mean)} [{f(low)}, {f(high)}]" if math.isfinite(low) else f"{f(mean)} [n/a]"


def _ckpt(r: dict[str, Any]) -> str:
    parts = [p for p, on in (("layer", r["layer_ckpt"]), ("step", r["step_ckpt"])) if on]
    return "+".join(parts) or "-"


def _same(r: dict[str, Any]) -> str:
    if not r["counterpart"]:
        return ""
    if r["identical_to_counterpart"] is None:
        return f"not compared with {r['counterpart']}: diverged"
    if r["identical_to_counterpart"]:
        return f"= {r['counterpart']}, bit-identical on seeds 0-{r['seeds'] - 1}"
    return f"differs from {r['counterpart']}: max diff {fmt(r['curve_max_abs_diff'], 3)}"


def variant_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per variant: seed-level intervals for base variants, the bit-identity check for checkpointed ones."""
    metrics = ["test_loss"] + (["test_acc"] if summary["classification"] else [])
    out = []
    for r in summary["rows"]:
        row = {"variant": r["variant"] + (" (counterpart)" if r["role"] == "counterpart" else "")
               + (" **diverged**" if r["status"] != "ok" else ""),
               "order": "first" if r["first_order"] else r.get("estimator") or "second",
               "inner LR": "learned" if r["learn_lr"] else "fixed", "ckpt": _ckpt(r), "seeds": r["seeds"]}
        for m in metrics:
            name = "loss" if m == "test_loss" else "accuracy"
            row[f"meta-test {name}: t 95% CI"] = _interval(r[f"{m}_mean"], r[f"{m}_t_low"], r[f"{m}_t_high"])
            row[f"{name}: bootstrap 95% CI"] = ("" if math.isnan(r[f"{m}_boot_low"])
                                                else f"[{fixed(r[f'{m}_boot_low'])}, {fixed(r[f'{m}_boot_high'])}]")
        ckpt = bool(r["counterpart"])  # trained on the verified seeds only: its scores are its counterpart's
        row.update({"final meta-train loss": "" if ckpt else fmt(r["final_train_loss"]),
                    "s/seed (CPU s)": f"{fixed(r['wall_s_per_seed'], 1)} ({fixed(r['cpu_s_per_seed'], 1)})",
                    "checkpoint check": _same(r)})
        out.append(row)
    return pd.DataFrame(out)


def effect_table(summary: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{
        "effect": e["label"], "a - b": f"{e['a']} - {e['b']}", "metric": e["metric"], "seeds": e["seeds"],
        "mean [t 95% CI]": _interval(e["mean_diff"], e["t_low"], e["t_high"], signed=True),
        "bootstrap 95% CI": "" if math.isnan(e["boot_low"]) else f"[{fixed(e['boot_low'], signed=True)}, {fixed(e['boot_high'], signed=True)}]",
        "p": fmt(e["p"], 2), "Holm CI (level)": (f"[{fixed(e['holm_low'], signed=True)}, {fixed(e['holm_high'], signed=True)}] "
                                                 f"({fixed(100 * e['holm_level'], 2)}%)" if e["seeds"] else ""),
        "Holm p": fmt(e["p_holm"], 2), "verdict": e["verdict"]} for e in summary["effects"]],
        columns=["effect", "a - b", "metric", "seeds", "mean [t 95% CI]", "bootstrap 95% CI", "p",
                 "Holm CI (level)", "Holm p", "verdict"])


def check_table(summary: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{
        "variant": c["variant"], "counterpart": c["counterpart"],
        "seeds checked": f"{c['seeds_checked']} of {c['seeds_total']}",
        "result": ("no claim: diverged on seed(s) " + ", ".join(map(str, c["diverged_seeds"])) if c["identical"] is None
                   else "bit-identical" if c["identical"] else f"differs (max {fmt(c['max_abs_diff'], 3)})")}
        for c in summary["checks"]], columns=["variant", "counterpart", "seeds checked", "result"])


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table of a DataFrame's cells (the one table writer, :mod:`harness.reporting.render`)."""
    return "\n".join(markdown_table(df.astype(str))) + "\n"


def check_line(summary: dict[str, Any]) -> str:
    """One sentence on the checkpoint check; never claims equality for a diverged cell."""
    checks = summary["checks"]
    if not checks:
        return "no checkpointed variant in this run"
    same = [c for c in checks if c["identical"] is True]
    unclaimed = [c["variant"] for c in checks if c["identical"] is None]
    differ = [c for c in checks if c["identical"] is False]
    seeds = checks[0]["seeds_checked"]
    parts = [f"{len(same)} of {len(checks)} checkpointed variants bit-identical to their non-checkpointed "
             f"counterparts on the {seeds} verified seed(s) (meta-train loss per step, meta-test curve, "
             f"per-task final scores)"]
    if differ:
        parts.append(f"{len(differ)} differ (largest difference {fmt(float(max(c['max_abs_diff'] for c in differ)), 3)})")
    if unclaimed:
        parts.append("no claim for " + ", ".join(unclaimed) + " (diverged)")
    return "; ".join(parts)


def markdown_tables(summary: dict[str, Any]) -> str:
    """The variant, effect and check tables as markdown (also printed by the command)."""
    m = len([e for e in summary["effects"] if e["seeds"]])
    return (markdown(variant_table(summary)) + "\nPaired effects over seeds (per-seed difference a - b of the "
            f"held-out means; Holm correction over the {m} effects tested, alpha {fmt(float(summary['alpha']), 6)}):\n\n"
            + markdown(effect_table(summary)) + "\nCheckpoint check:\n\n" + markdown(check_table(summary)))


def _header(summary: dict[str, Any], out: Path, plot_paths: list[Path]) -> list[str]:
    cfg, env = summary["config"], summary["env"]
    return [f"# Ablation `{summary['run_id']}`: preset `{cfg['preset']}`", "",
            f"Command: `{summary.get('command') or ''}`", "",
            f"{cfg['meta_steps']} meta-steps; base variants on {cfg['seeds']} seeds (seed = initialisation and "
            f"training task stream, the same for every variant), checkpointed variants on the first "
            f"{cfg['verify_seeds']} seeds only, where they are checked against their counterparts; "
            f"{cfg['eval_tasks']} held-out tasks per seed; meta-batch {cfg['meta_batch'] or 'preset'}, inner steps "
            f"{cfg['inner_steps'] or 'preset'}, {cfg['device']} {cfg['dtype']}, {cfg['threads'] or 'default'} "
            "thread(s).", "",
            "**Statistics:** the unit is the training seed: each seed's score is its mean over the held-out tasks; "
            "intervals are 95% Student-t intervals over the per-seed scores (scipy.stats.t) and percentile "
            f"bootstrap intervals over seeds ({summary.get('bootstrap_resamples', 10000)} resamples, fixed "
            "generator). Effects are paired per seed. **Correction:** Holm step-down over every effect in the "
            "table; a verdict says \"better\" only when the Holm-adjusted p < alpha, i.e. when the t-interval at "
            "Holm's level for that step (column \"Holm CI\") excludes 0.", "",
            f"**Checkpoint check:** {check_line(summary)}.", "",
            markdown_tables(summary),
            "Curves (mean over seeds, band: t 95% interval over seeds): "
            + ", ".join(f"[{p.name}]({Path(os.path.relpath(p, out)).as_posix()})" for p in plot_paths), "",
            f"Environment: torch {env['torch']}, {env['cpu']}, {env['host']}, commit {env['git_commit']}"
            f"{' (dirty)' if env['git_dirty'] else ''}, {env['utc']}; this invocation trained "
            f"{summary['trained_cells']} cells in {fixed(summary['train_wall_s'], 1)} s and reused "
            f"{summary['reused_cells']}; the cells' own training + evaluation time sums to "
            f"{fixed(summary['cells_wall_s'], 1)} s wall, {fixed(summary['cells_cpu_s'], 1)} s CPU (the CPU figure is the "
            "one a busy shared machine does not inflate).", ""]


def write_report(row: AblationSummary, out: Path, plots: Path) -> None:
    """ablation.csv, effects.csv, checks.csv, table.md, summary.json (the row, without its curves) and the
    learning-curve plot."""
    summary = row.to_dict()
    write_atomic(out / "ablation.csv", pd.DataFrame(summary["rows"]).to_csv(index=False))
    write_atomic(out / "effects.csv", pd.DataFrame(summary["effects"]).to_csv(index=False))
    checks = pd.DataFrame(summary["checks"], columns=["variant", "counterpart", "seeds_checked", "seeds_total",
                                                      "diverged_seeds", "max_abs_diff", "identical"])
    write_atomic(out / "checks.csv", checks.to_csv(index=False))
    plot_paths = plot_curves(summary, plots)
    write_atomic(out / "table.md", "\n".join(_header(summary, out, plot_paths)))
    write_json(out / "summary.json", replace(row, curves=None))
