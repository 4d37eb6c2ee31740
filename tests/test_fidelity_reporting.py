"""Reporting of an estimator run (issue 23): the ``fidelity`` doc block (cosine and relative error against the exact
meta-gradient, the CG residual, peak against ``maml``'s at the same K, the paired time) and ``fidelity.png``, the
frontier, drawn only for a run whose cells carry a fidelity.

    python -m pytest -q tests/test_fidelity_reporting.py
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from harness.reporting import plots
from harness.reporting.docblocks import fidelity_table
from harness.reporting.files import read_cells, write_cells
from harness.reporting.frame import cells_frame

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "results" / "sweep-segments-cpu"  # a committed sweep: its rows relabelled as an estimator run


def _estimator_run(tmp_path: Path) -> Path:
    base = read_cells(RUN)[0]
    mem = base.memory["cpu_peak_alloc_mib"]
    cells = []
    for k, scale in ((2, 1.0), (8, 4.0)):
        settings = {"inner_steps": k}
        cells.append(replace(base, variant="maml", settings=settings, key=f"m{k}",
                             memory={**base.memory, "cpu_peak_alloc_mib": mem * scale}))
        cells.append(replace(base, variant="trunc", settings=settings, key=f"t{k}", fidelity={
            "w_rel_err": 0.125 * k, "w_cosine": 1 - 9e-6 * k,  # 6 digits tell it from 1 "lr_rel_err": None, "lr_cosine": None,
            "cg_residual": None}, memory={**base.memory, "cpu_peak_alloc_mib": mem / 2}))
    cells.append(replace(base, variant="imaml", settings={"inner_steps": 2}, key="i2", fidelity={
        "w_rel_err": 0.5, "w_cosine": 0.75, "lr_rel_err": None, "lr_cosine": None, "cg_residual": 3e-4}))
    (tmp_path / "f").mkdir()
    write_cells(tmp_path / "f" / "cells.jsonl", [replace(c, sweep_param="inner_steps") for c in cells])
    return tmp_path


def test_the_fidelity_block_on_exact_small_values(tmp_path: Path) -> None:
    root = _estimator_run(tmp_path)
    lines = fidelity_table(root, "f")
    assert lines[0] == ("| variant | K | cosine vs exact | rel err vs exact | CG residual | peak MiB | peak / maml | "
                        "time / ref (paired, IQR) |")
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("| `maml`", "2"), ("| `maml`", "8"), ("| `trunc`", "2"),
                                            ("| `trunc`", "8"), ("| `imaml`", "2")]  # the run's order, then K
    assert rows[0][2:4] == ["1 (exact)", "0 (exact)"]
    assert rows[2][2:4] == ["0.999982", "0.25"] and rows[2][6] == "0.500x"  # half maml's peak at K = 2
    assert rows[3][2:4] == ["0.999928", "1"] and rows[3][6] == "0.125x"  # maml's peak at K = 8 is 4x
    assert rows[4][2:5] == ["0.75", "0.5", "0.0003"] and rows[4][6] == "1.000x"


def test_the_frontier_is_drawn_only_for_a_run_with_fidelity(tmp_path: Path) -> None:
    root = _estimator_run(tmp_path)
    rows = read_cells(root / "f")
    flat = cells_frame(rows).to_dict("records")
    written = plots.make_plots(flat, [r.settings for r in rows], "inner_steps", tmp_path / "p", "t")
    assert (tmp_path / "p" / "fidelity.png") in written
    plain = read_cells(RUN)
    written = plots.make_plots(cells_frame(plain).to_dict("records"), [r.settings for r in plain], "step_ckpt",
                               tmp_path / "q", "t")
    assert not (tmp_path / "q" / "fidelity.png").exists() and written


def test_fidelity_columns_appear_only_when_a_run_has_an_approximation(tmp_path: Path) -> None:
    from harness.reporting.tables import COLUMNS, FIDELITY_COLUMNS, summary_csv, table_md

    frame = cells_frame(read_cells(_estimator_run(tmp_path) / "f"))
    header, first_trunc = summary_csv(frame).splitlines()[0], summary_csv(frame).splitlines()[2]
    assert header.split(",") == COLUMNS + FIDELITY_COLUMNS
    assert first_trunc.endswith(",0.25,0.999982,,,")  # w_rel_err, w_cosine, no LR errors, no CG residual
    md = table_md(frame, "f")
    assert "| rel err vs exact | cosine vs exact | CG residual |" in md and "| 0.25 | 0.999982 |" in md
    plain = cells_frame(read_cells(RUN))
    assert summary_csv(plain).splitlines()[0].split(",") == COLUMNS and "vs exact" not in table_md(plain, "p")
