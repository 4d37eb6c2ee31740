"""Reporting of the long-horizon run (issue 22): the planner's ``plan`` and ``predicted_peak_mib`` in summary.csv and
table.md only when a run has them (committed runs without a budget unchanged), a sweep's lines told apart by the
settings that differ within a variant, log-log axes for a sweep over decades, and the ``horizon`` doc block.

    python -m pytest -q tests/test_horizon_reporting.py
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from harness.reporting.horizon_tables import horizon_table
from harness.reporting.files import read_cells, write_cells
from harness.reporting.frame import cells_frame, line_labels
from harness.reporting import plots
from harness.reporting.tables import COLUMNS, summary_csv, table_md

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "results" / "sweep-segments-cpu"  # a committed sweep without a budget
MIB = 2 ** 20


def test_plan_columns_appear_only_when_a_run_has_a_plan() -> None:
    rows = read_cells(RUN)
    assert summary_csv(cells_frame(rows)).splitlines()[0].split(",") == COLUMNS  # no budget: no plan columns
    assert "plan" not in table_md(cells_frame(rows), RUN.name)
    planned = [replace(rows[0], plan="layer_ckpt=off,snapshots=3", predicted_peak_mib=9.25), *rows[1:]]
    csv = summary_csv(cells_frame(planned))
    assert csv.splitlines()[0].split(",")[-2:] == ["plan", "predicted_peak_mib"]
    assert '"layer_ckpt=off,snapshots=3",9.25' in csv.splitlines()[1]
    md = table_md(cells_frame(planned), "t")
    assert "| plan | predicted peak MiB |" in md and "| layer_ckpt=off,snapshots=3 | 9.25 |" in md


def test_sweep_lines_name_the_settings_that_differ_within_a_variant() -> None:
    settings = [{"inner_steps": 8, "meta_batch": 1}, {"inner_steps": 8, "meta_batch": 1, "memory_budget": 12 * MIB},
                {"inner_steps": 8, "meta_batch": 1, "step_ckpt": "sqrt", "step_rebuild": "step"},
                {"inner_steps": 8, "meta_batch": 1}, {"inner_steps": 32, "meta_batch": 1}]
    assert line_labels(["lr", "lr", "sckpt_lr", "sckpt_lr", "bckpt_lr"], settings, "inner_steps") == [
        "lr", "lr memory_budget=12MiB", "sckpt_lr step_ckpt=sqrt,step_rebuild=step", "sckpt_lr", "bckpt_lr"]


def _horizon_run(tmp_path: Path) -> Path:
    """A committed sweep's rows relabelled as a small horizon run: lr plain and under a budget, sckpt_lr."""
    rows = [r for r in read_cells(RUN) if r.settings.get("step_ckpt") in (1, 2)][:2]
    out = []
    for k, r in zip((8, 1024), rows):
        base = {**{k_: v for k_, v in r.settings.items() if k_ != "step_ckpt"}, "inner_steps": k}
        out.append(replace(r, variant="sckpt_lr", settings=base, key=f"s{k}"))
        out.append(replace(r, variant="lr", settings={**base, "memory_budget": 12 * MIB}, key=f"b{k}",
                           plan="layer_ckpt=off,snapshots=10", predicted_peak_mib=r.memory["cpu_peak_alloc_mib"] * 1.05))
    (tmp_path / "h").mkdir()
    write_cells(tmp_path / "h" / "cells.jsonl", [replace(r, sweep_param="inner_steps") for r in out])
    return tmp_path


def test_the_horizon_block_pivots_memory_and_checks_the_planner(tmp_path: Path) -> None:
    root = _horizon_run(tmp_path)
    memory = horizon_table(root, "h", "memory")
    assert memory[0] == "| K | `sckpt_lr` | `lr memory_budget=12MiB` |" and memory[2].startswith("| 8 |")
    planner = horizon_table(root, "h", "planner")
    assert [line.split(" | ")[5] for line in planner[2:]] == ["+5.0%", "+5.0%"]
    assert all(line.endswith("| yes |") for line in planner[2:])
    time = horizon_table(root, "h", "time")
    assert "vs `sckpt_lr`" in time[2]
    targets = horizon_table(root, "h", "targets")
    assert targets[2] == "| planner: predicted / measured peak, worst of 2 cells | within ±10% | +5.0% (lr memory_budget=12MiB, K = 8) | yes |"
    assert targets[3] == "| planner: cells over their budget | none | 0 | yes |"


def test_a_sweep_over_decades_is_drawn_log_log(tmp_path: Path, monkeypatch) -> None:
    scales = []
    real = plots.plt.subplots

    def spy(*args, **kwargs):
        fig, ax = real(*args, **kwargs)
        monkeypatch.setattr(ax, "set_xscale", lambda *a, **k: scales.append(a[0]))
        return fig, ax

    monkeypatch.setattr(plots.plt, "subplots", spy)
    flat = [{"status": "ok", "variant": "lr", "mem_mib": m, "time_median_ms": 1.0, "mem_figure": "cpu_peak_alloc_mib"}
            for m in (1.0, 2.0)]
    plots.sweep_plots(flat, [{"inner_steps": 8}, {"inner_steps": 1024}], "inner_steps", "t", lambda f, n: None,
                      "cpu_peak_alloc_mib")
    assert scales == ["log", "log"]
    scales.clear()
    plots.sweep_plots(flat, [{"inner_steps": 1}, {"inner_steps": 16}], "inner_steps", "t", lambda f, n: None,
                      "cpu_peak_alloc_mib")
    assert scales == []
