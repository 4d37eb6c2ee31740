"""Claims: every result row is a typed dataclass with one schema version; a row survives a write and a read
unchanged (NaN and missing figures included, unknown keys kept); a row of the wrong shape is refused with
a ResultsError naming the file and the line, and a writer refuses to write one."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from harness.bench.cells import Cell, base_row
from harness.reporting.files import _clean, read_cells, read_row, write_cells, write_json, write_jsonl
from harness.reporting.schema import (ROW_TYPES, SCHEMA_VERSION, AblationCell, AblationSummary, CellRow,
                                      DiagnosisResult, ResultsError, RunResult, ScalingResult)

REPO = Path(__file__).resolve().parent.parent


def a_cell(**changes) -> dict:
    """A cell's row as the file holds it (a plain dict: what a test writes to make a file)."""
    row = base_row(Cell("ckpt_lr", "cpu-bench", settings={"width": 16})).to_dict()
    row.update(status="ok", memory={"cpu_peak_alloc_mib": 1.5, "nvml_peak_mib": None},
               time={"median_ms": 3.0, "iqr_ms": 0.1, "min_ms": 2.9, "count": 3, "noisy": False},
               agreement={"w_rel_err": 0.0, "w_cosine": 1.0, "lr_rel_err": float("nan"), "lr_cosine": None},
               final_query_loss=0.25, wall_s=1.0, losses=[0.5, 0.25], run_id="r", custom_note="kept")
    row.update(changes)
    return row


def test_one_schema_version_for_every_row_type() -> None:
    assert set(ROW_TYPES) == {"cell", "run", "diagnosis", "ablation-cell", "ablation", "scaling"}
    assert all(t().schema == SCHEMA_VERSION for t in ROW_TYPES.values())


def test_a_cell_row_round_trips_through_the_file(tmp_path: Path) -> None:
    row = a_cell()
    write_cells(tmp_path / "cells.jsonl", [CellRow.from_dict(row), CellRow.from_dict(a_cell(variant="fo", key="k2"))])
    first, second = read_cells(tmp_path)
    assert isinstance(first, CellRow) and first.variant == "ckpt_lr" and second.variant == "fo"
    assert first.memory == {"cpu_peak_alloc_mib": 1.5, "nvml_peak_mib": None}  # a missing figure stays None
    assert math.isnan(first.agreement["lr_rel_err"])  # NaN survives (stored as "nan")
    assert first.time["count"] == 3 and isinstance(first.time["count"], int)
    assert first.extra == {"custom_note": "kept"} and first.losses == [0.5, 0.25]
    back = first.to_dict()
    assert json.dumps(back, sort_keys=True) == json.dumps(row, sort_keys=True)
    assert "traceback" not in back and "sweep_param" not in back  # optional fields absent when unset


def test_every_committed_result_file_reads_and_round_trips_unchanged() -> None:
    cells = sorted((REPO / "results").glob("*/cells.jsonl"))
    assert cells
    for path in cells:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [json.loads(json.dumps(write_form(r))) for r in read_cells(path)] == lines, path
    for path in sorted((REPO / "results").glob("diagnosis*.json")):
        assert write_form(read_row(path, DiagnosisResult)) == json.loads(path.read_text()), path
    summaries = sorted((REPO / "results").glob("*/summary.json"))
    assert summaries
    for path in summaries:
        assert write_form(read_row(path, AblationSummary)) == json.loads(path.read_text()), path
    scaling = REPO / "results" / "scaling-cpu" / "scaling.json"
    assert write_form(read_row(scaling, ScalingResult)) == json.loads(scaling.read_text())


def write_form(row) -> dict:
    return _clean(row.to_dict())  # the writer's NaN encoding, to compare with the file


@pytest.mark.parametrize("field, value, says", [
    ("memory", "lots", "field 'memory' must be an object, got str 'lots'"),
    ("memory", {"cpu_peak_alloc_mib": "lots"}, "field 'memory.cpu_peak_alloc_mib' must be a number"),
    ("status", None, "field 'status' must be a string, got NoneType"),
    ("seed", "0", "field 'seed' must be an integer"),
    ("seed", True, "field 'seed' must be an integer"),
    ("settings", [], "field 'settings' must be an object"),
    ("final_query_loss", "low", "field 'final_query_loss' must be a number"),
    ("schema", 2, "has schema version 2, expected 1"),
    ("kind", "run", "kind 'run', expected 'cell'"),
    ("model", 3, "field 'model' must be a string or null"),
    ("ckpt", "layers.*", "field 'ckpt' must be a list or null"),
    ("fd_rel_err", "small", "field 'fd_rel_err' must be a number"),
])
def test_a_malformed_row_names_the_file_and_the_line(tmp_path: Path, field, value, says) -> None:
    rows = [a_cell(), a_cell(**{field: value})]
    write_jsonl(tmp_path / "cells.jsonl", rows)  # the unvalidated writer, to make a bad file
    with pytest.raises(ResultsError) as err:
        read_cells(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'cells.jsonl'}: line 2") and says in str(err.value)


def test_a_row_without_its_identity_or_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps({"schema": 1, "variant": "maml", "status": "ok"}) + "\n")
    with pytest.raises(ResultsError, match=r"line 1 lacks field 'key'"):
        read_cells(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ResultsError, match=r"line 1: expected a JSON object, got list"):
        read_cells(path)


def test_writers_refuse_a_row_of_the_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="CellRow being written: field 'memory' must be an object"):
        write_cells(tmp_path / "cells.jsonl", [dataclasses.replace(CellRow.from_dict(a_cell()), memory="lots")])
    with pytest.raises(TypeError, match="cells.jsonl holds CellRow rows, got dict"):
        write_cells(tmp_path / "cells.jsonl", [a_cell()])  # a plain dict is not a row
    with pytest.raises(ResultsError, match="RunResult being written: field 'skipped_steps' must be an integer"):
        write_json(tmp_path / "run.json", RunResult(spec={"variant": "maml"}, skipped_steps="none"))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_user_models_cell_and_run_keep_their_specs_and_finite_differences(tmp_path: Path) -> None:
    """Issue 21: optional fields, absent from preset rows (so every committed row reads and writes unchanged)."""
    cell = Cell("vmaml", "quick", model="/m.py:make", tasks="pkg.tasks:sample", ckpt=("layers.*",))
    row = {**a_cell(), **base_row(cell).to_dict(), "status": "ok", "fd_rel_err": float("nan")}
    (back,) = read_cells(write_cells(tmp_path / "cells.jsonl", [CellRow.from_dict(row)]))
    assert (back.model, back.tasks, back.ckpt) == ("/m.py:make", "pkg.tasks:sample", ["layers.*"])
    assert math.isnan(back.fd_rel_err) and back.key == cell.key() and back.extra == {"custom_note": "kept"}
    assert not {"model", "tasks", "ckpt", "fd_rel_err"} & set(a_cell())
    run = RunResult(status="ok", spec={"variant": "maml"}, model="/m.py:make", ckpt=["layers.*"])
    again = read_row(write_json(tmp_path / "run.json", run), RunResult)
    assert again.model == "/m.py:make" and again.tasks is None and "tasks" not in again.to_dict()


def test_run_result_and_diagnosis_read_back(tmp_path: Path) -> None:
    run = RunResult(status="diverged", message="NaN", spec={"variant": "lr"}, wall_s=float("inf"),
                    agreement={"w_rel_err": float("nan"), "lr_rel_err": None}, final_query_loss=None)
    back = read_row(write_json(tmp_path / "run.json", run), RunResult)
    assert back.status == "diverged" and math.isinf(back.wall_s)
    assert math.isnan(back.agreement["w_rel_err"]) and back.agreement["lr_rel_err"] is None
    (tmp_path / "d.json").write_text("{\"schema\": 1, \"kind\": \"diagnosis\"")
    with pytest.raises(ResultsError, match="d.json: not valid JSON"):
        read_row(tmp_path / "d.json", DiagnosisResult)
    with pytest.raises(ResultsError, match="run.json: kind 'run', expected 'diagnosis'"):
        read_row(tmp_path / "run.json", DiagnosisResult)


def an_ablation_cell(**changes) -> AblationCell:
    cell = AblationCell(status="ok", variant={"name": "lr", "learn_lr": True}, seed=1, spec={"preset": "quick"},
                        sizes={"params": 10}, train_loss=[0.5, 0.25], curve_steps=[0, 2],
                        curve_test_loss=[0.9, float("nan")], curve_test_acc=[0.5, None], test_loss=[0.1, 0.3],
                        test_acc=[1.0, 0.5], learned_lrs={"w": 0.01}, wall_s=1.5, cpu_s=float("inf"))
    return dataclasses.replace(cell, **changes)


def test_ablation_cell_and_summary_read_back(tmp_path: Path) -> None:
    cell = read_row(write_json(tmp_path / "cells" / "lr_s1.json", an_ablation_cell()), AblationCell)
    assert cell.variant["name"] == "lr" and cell.seed == 1 and cell.test_loss == [0.1, 0.3]
    assert math.isnan(cell.curve_test_loss[1]) and math.isinf(cell.cpu_s)  # NaN/inf in lists and fields
    assert cell.curve_test_acc == [0.5, None] and cell.extra == {}
    assert list(json.loads((tmp_path / "cells" / "lr_s1.json").read_text()))[:3] == ["schema", "kind", "status"]
    summary = AblationSummary(classification=True, rows=[{"variant": "lr", "test_loss_mean": 0.25}],
                              effects=[], checks=[], curves=None, alpha=0.05, bootstrap_resamples=100,
                              all_identical=True, run_id="a", command="python -m harness ablate",
                              config={"seeds": 2}, trained_cells=2, reused_cells=0, train_wall_s=float("nan"),
                              cells_wall_s=2.0, cells_cpu_s=1.5)
    back = read_row(write_json(tmp_path / "summary.json", summary), AblationSummary)
    assert back.run_id == "a" and back.classification and back.rows == summary.rows and back.config == {"seeds": 2}
    assert math.isnan(back.train_wall_s) and back.trained_cells == 2 and back.curves is None
    assert "curves" not in json.loads((tmp_path / "summary.json").read_text())  # optional: absent when None
    write_json(tmp_path / "bad.json", {**summary.to_dict(), "trained_cells": "two"})
    with pytest.raises(ResultsError, match=r"bad.json: field 'trained_cells' must be an integer"):
        read_row(tmp_path / "bad.json", AblationSummary)


@pytest.mark.parametrize("field, value, says", [
    ("test_loss", "low", "field 'test_loss' must be a list, got str"),
    ("test_loss", [0.1, "low"], "field 'test_loss[1]' must be a number"),
    ("variant", "lr", "field 'variant' must be an object"),
    ("wall_s", "slow", "field 'wall_s' must be a number"),
    ("seed", 1.5, "field 'seed' must be an integer"),
    ("schema", 2, "has schema version 2, expected 1"),  # cells written before the one SCHEMA_VERSION
    ("kind", "cell", "kind 'cell', expected 'ablation-cell'"),
])
def test_a_malformed_ablation_cell_names_the_file(tmp_path: Path, field, value, says) -> None:
    path = tmp_path / "lr_s1.json"
    write_json(path, {**an_ablation_cell().to_dict(), field: value})  # plain data: written unvalidated
    with pytest.raises(ResultsError) as err:
        read_row(path, AblationCell)
    assert str(err.value).startswith(str(path)) and says in str(err.value)


def test_a_truncated_ablation_cell_names_the_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "lr_s1.json", an_ablation_cell())
    data = json.loads(path.read_text())
    del data["test_loss"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"lr_s1.json lacks field 'test_loss'"):
        read_row(path, AblationCell)
    path.write_text(path.read_text()[:40])
    with pytest.raises(ResultsError, match=r"lr_s1.json: not valid JSON"):
        read_row(path, AblationCell)


def a_scaling_result() -> ScalingResult:
    run = RunResult(spec={"variant": "ckpt_lr"}, time={"median_ms": 100.0}).to_dict()
    return ScalingResult(ranks=2, pairs=1, run_args=["--variant", "ckpt_lr"], sample_meta_batch_ms=float("nan"),
                         summary={"speedup_median": 1.6}, runs=[{"one": run, "many": run, "speedup": 1.6}],
                         command="python -m harness scaling --pairs 1")


def test_a_scaling_result_reads_back(tmp_path: Path) -> None:
    back = read_row(write_json(tmp_path / "scaling-cpu" / "scaling.json", a_scaling_result()), ScalingResult)
    assert (back.ranks, back.pairs, back.run_args) == (2, 1, ["--variant", "ckpt_lr"])
    assert math.isnan(back.sample_meta_batch_ms) and back.runs[0]["one"]["time"] == {"median_ms": 100.0}
    assert back.summary == {"speedup_median": 1.6} and back.command == "python -m harness scaling --pairs 1"


@pytest.mark.parametrize("field, value, says", [
    ("ranks", "two", "field 'ranks' must be an integer"),
    ("runs", {}, "field 'runs' must be a list"),
    ("summary", None, "field 'summary' must be an object"),
    ("sample_meta_batch_ms", "fast", "field 'sample_meta_batch_ms' must be a number"),
    ("schema", 2, "has schema version 2, expected 1"),
])
def test_a_malformed_scaling_file_names_the_file(tmp_path: Path, field, value, says) -> None:
    path = tmp_path / "scaling.json"
    write_json(path, {**a_scaling_result().to_dict(), field: value})
    with pytest.raises(ResultsError) as err:
        read_row(path, ScalingResult)
    assert str(err.value).startswith(str(path)) and says in str(err.value)


def test_a_scaling_file_without_its_runs_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "scaling.json"
    write_json(path, {k: v for k, v in a_scaling_result().to_dict().items() if k != "runs"})
    with pytest.raises(ResultsError, match=r"scaling.json lacks field 'runs'"):
        read_row(path, ScalingResult)
