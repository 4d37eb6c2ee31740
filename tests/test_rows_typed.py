"""Claims (issue 26): rows are typed from where they are made to where they are written and read, and a
row written by an older schema version reads through the migrations and gives the same table.

Each maker returns its dataclass (``base_row``, the child's ``measure_cell_inline``, the driver's isolated
measurement, the matrix's rows, ``run_single``'s result, the diagnosis); ``to_dict`` happens only at the file
boundary.  A version-1 cell file, written below exactly as the committed ``results/*/cells.jsonl`` are
written today, reads with the current code into the table version 1 gave; a migration runs before validation;
a version this code cannot read is one line naming the versions it reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from harness.bench.cells import Cell, MeasureOptions, base_row
from harness.bench.child import RowSoFar, measure_cell_inline
from harness.bench.matrix import lost_cell_row, run_matrix
from harness.bench.process import measure_cell_isolated
from harness.bench.single import run_single
from harness.bench.store import merge_rows, read_rows, run_dir_lock
from harness.loop.spec import RunSpec
from harness.reporting import tables, versions
from harness.reporting.files import read_cells, read_row
from harness.reporting.frame import cells_frame
from harness.reporting.schema import CellRow, DiagnosisResult, ResultsError, RunResult
from harness.reporting.tables import table_md
from harness.studies.seed import diagnose as seed_diagnose
from harness.studies.seed.report import markdown
from harness.variants import get_variant
from tests.conftest import FAST, TINY

# Two cells of results/baseline/cells.jsonl as version 1 wrote them (one JSON object per blank-line block).
V1_CELLS = """\
{"schema": 1, "kind": "cell",
 "key": "[\\"maml\\", \\"cpu-bench\\", \\"cpu\\", \\"float32\\", [[\\"depth\\", 2], [\\"task.sequences\\", 2], [\\"task.tokens\\", 8], [\\"width\\", 16]], 0]",
 "variant": "maml", "base_variant": "maml", "peer": null,
 "flags": {"layer_ckpt": false, "learn_lr": false, "first_order": false, "step_ckpt": 0, "lr_per_step": false, "vectorize": false, "vmap_chunk": 0},
 "preset": "cpu-bench", "device": "cpu", "dtype": "float32",
 "settings": {"width": 16, "depth": 2, "task.sequences": 2, "task.tokens": 8}, "seed": 0, "amp": "off",
 "status": "ok", "message": null,
 "memory": {"cpu_peak_alloc_mib": 0.1856231689453125, "cpu_total_alloc_mib": 2.1802597045898438},
 "time": {"median_ms": 14.841218000583467, "iqr_ms": 0.0, "min_ms": 14.841218000583467, "count": 1, "noisy": false},
 "agreement": {"w_rel_err": 0.0, "w_cosine": 0.999999999999999, "lr_rel_err": null, "lr_cosine": null},
 "final_query_loss": 0.5719443559646606, "warnings": [],
 "sizes": {"inner_steps": 2, "meta_batch": 2, "meta_steps": 3, "inner_lr": 0.05, "outer_lr": 0.001, "adapt_last": null},
 "losses": [0.6996282041072845, 0.5719443559646606], "wall_s": 2.175218426000356,
 "env": {"python": "3.11.7", "torch": "2.14.1+cu130", "cuda": "13.0", "cudnn": null, "gpu": null, "driver": null, "cpu": "x86_64", "threads": 1, "host": "vm", "platform": "Linux-6.18.44-fc-v595-x86_64-with-glibc2.36", "git_commit": "7a47a5adfeb160a5b6ac19a0ac985b3686aa4a1f", "git_dirty": false, "utc": "2026-11-26T01:21:29+00:00"},
 "run_id": "baseline",
 "measure_opts": {"warmup": 0, "repeats": 1, "timeout_s": 300.0, "nvml": true, "cpu_mem_cap_mib": null, "threads": 1, "pairs": 1},
 "distributed": {"world_size": 1, "backend": null, "memory_key": "cpu_peak_alloc_mib", "rank_memory_mib": [0.1856231689453125], "max_rank_memory_mib": 0.1856231689453125}}

{"schema": 1, "kind": "cell",
 "key": "[\\"fo\\", \\"cpu-bench\\", \\"cpu\\", \\"float32\\", [[\\"depth\\", 2], [\\"task.sequences\\", 2], [\\"task.tokens\\", 8], [\\"width\\", 16]], 0]",
 "variant": "fo", "base_variant": "fo", "peer": null,
 "flags": {"layer_ckpt": false, "learn_lr": false, "first_order": true, "step_ckpt": 0, "lr_per_step": false, "vectorize": false, "vmap_chunk": 0},
 "preset": "cpu-bench", "device": "cpu", "dtype": "float32",
 "settings": {"width": 16, "depth": 2, "task.sequences": 2, "task.tokens": 8}, "seed": 0, "amp": "off",
 "status": "ok", "message": null,
 "memory": {"cpu_peak_alloc_mib": 0.08679580688476562, "cpu_total_alloc_mib": 0.6555557250976562},
 "time": {"median_ms": 10.047772999314475, "iqr_ms": 0.0, "min_ms": 10.047772999314475, "count": 1, "noisy": false},
 "agreement": {"w_rel_err": 0.0, "w_cosine": 0.9999999999999992, "lr_rel_err": null, "lr_cosine": null},
 "final_query_loss": 0.5713748931884766, "warnings": [],
 "paired": {"reference": "maml", "order": "alternating", "pairs": 1, "ratios": [0.5271111885671361], "median": 0.5271111885671361, "q1": 0.5271111885671361, "q3": 0.5271111885671361, "iqr": 0.0, "min": 0.5271111885671361, "max": 0.5271111885671361, "clock": "cpu", "wall": {"reference": "maml", "order": "alternating", "pairs": 1, "ratios": [0.5272266840663612], "median": 0.5272266840663612, "q1": 0.5272266840663612, "q3": 0.5272266840663612, "iqr": 0.0, "min": 0.5272266840663612, "max": 0.5272266840663612}},
 "sizes": {"inner_steps": 2, "meta_batch": 2, "meta_steps": 3, "inner_lr": 0.05, "outer_lr": 0.001, "adapt_last": null},
 "losses": [0.6996282041072845, 0.5713748931884766], "wall_s": 2.167588157000864,
 "env": {"python": "3.11.7", "torch": "2.14.1+cu130", "cuda": "13.0", "cudnn": null, "gpu": null, "driver": null, "cpu": "x86_64", "threads": 1, "host": "vm", "platform": "Linux-6.18.44-fc-v595-x86_64-with-glibc2.36", "git_commit": "7a47a5adfeb160a5b6ac19a0ac985b3686aa4a1f", "git_dirty": false, "utc": "2026-11-26T01:21:36+00:00"},
 "run_id": "baseline",
 "measure_opts": {"warmup": 0, "repeats": 1, "timeout_s": 300.0, "nvml": true, "cpu_mem_cap_mib": null, "threads": 1, "pairs": 1},
 "distributed": {"world_size": 1, "backend": null, "memory_key": "cpu_peak_alloc_mib", "rank_memory_mib": [0.08679580688476562], "max_rank_memory_mib": 0.08679580688476562}}
"""
# ... and the table version 1 built from them (results/baseline/table.md's first two lines)
V1_TABLE = """\
# v1

Preset: cpu-bench (cpu, float32). Memory figure: cpu_peak_alloc_mib. Ratios are against `maml` in the same \
preset/settings. On the CPU the memory figure is deterministic (live tensor bytes); the times depend on the \
machine's load (noisy on a shared machine) and are no guide to GPU speed.

| variant | settings | status | peak mem MiB | mem / maml | median ms | IQR ms | time / maml | \
time / ref (paired, IQR) | w rel err | lr rel err | final query loss |
|---|---|---|---|---|---|---|---|---|---|---|---|
| maml | depth=2,task.sequences=2,task.tokens=8,width=16 | ok | 0.1856 | 1.000x | 14.84 | 0 | 1.000x | — | 0 |  \
| 0.5719 |
| fo | depth=2,task.sequences=2,task.tokens=8,width=16 | ok | 0.0868 | 0.468x | 10.05 | 0 | 0.677x | \
0.527x [0.527-0.527] vs maml | 0 |  | 0.5714 |
"""


def v1_rows() -> list[dict]:
    return [json.loads(block) for block in V1_CELLS.split("\n\n")]


def write_v1(tmp_path: Path, rows: list[dict] | None = None) -> Path:
    path = tmp_path / "v1" / "cells.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or v1_rows())))
    return path


def test_a_version_1_cell_file_reads_into_the_table_version_1_gave(tmp_path: Path) -> None:
    rows = read_cells(write_v1(tmp_path))
    assert all(type(r) is CellRow and r.schema == versions.SCHEMA_VERSION for r in rows)
    assert table_md(cells_frame(rows), "v1") == V1_TABLE


def test_a_migration_runs_before_validation_one_version_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Code of version 3 reading a version-1 file: version 1 stored the seed as text (say), 2 named the query
    loss ``final_loss``; each step takes the row one version up, and only then are the fields checked."""
    old = v1_rows()
    for r in old:
        r["seed"] = str(r["seed"])
        r["final_loss"] = r.pop("final_query_loss")
    steps: list[int] = []

    def seed_as_int(row: dict) -> dict:
        steps.append(row["schema"])
        return {**row, "seed": int(row["seed"])}

    def loss_renamed(row: dict) -> dict:
        steps.append(row["schema"])
        return {**{k: v for k, v in row.items() if k != "final_loss"}, "final_query_loss": row["final_loss"]}

    monkeypatch.setattr(versions, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(versions, "MIGRATIONS", {1: seed_as_int, 2: loss_renamed})
    assert versions.readable_versions() == (1, 2, 3)
    rows = read_cells(write_v1(tmp_path, old))
    assert steps == [1, 2, 1, 2] and [r.schema for r in rows] == [3, 3]
    assert [r.seed for r in rows] == [0, 0] and "final_loss" not in rows[0].extra
    assert table_md(cells_frame(rows), "v1") == V1_TABLE
    monkeypatch.setattr(versions, "MIGRATIONS", {2: loss_renamed})  # no way from 1 to 2: version 1 is unreadable
    with pytest.raises(ResultsError, match=r"line 1 has schema version 1, expected 2 or 3 \(the versions this code"):
        read_cells(write_v1(tmp_path, old))


@pytest.mark.parametrize("version, says", [
    (2, "has schema version 2, expected 1 (the versions this code reads; written by a newer harness)"),
    (0, "has schema version 0, expected 1 (the versions this code reads)"),
    ("1", "has schema version '1', expected 1 (the versions this code reads)"),
    (True, "has schema version True, expected 1 (the versions this code reads)"),
])
def test_a_version_this_code_cannot_read_is_one_line_naming_the_versions_it_reads(tmp_path: Path, version,
                                                                                   says) -> None:
    rows = v1_rows()
    rows[1]["schema"] = version
    with pytest.raises(ResultsError) as err:
        read_cells(write_v1(tmp_path, rows))
    assert str(err.value) == f"{tmp_path / 'v1' / 'cells.jsonl'}: line 2 {says}"
    (tmp_path / "run.json").write_text(json.dumps({**RunResult().to_dict(), "schema": version}))
    with pytest.raises(ResultsError, match="run.json has schema version"):
        read_row(tmp_path / "run.json", RunResult)


# -- each maker returns its dataclass; the file holds exactly its to_dict() ---------------------------------------
def test_run_single_returns_the_run_result_it_wrote(tmp_path: Path) -> None:
    done = run_single(RunSpec(variant="lr", preset="quick", inner_steps=1, meta_batch=2, meta_steps=2), tmp_path,
                      progress=False)
    assert type(done.result) is RunResult and done.ok and done.path is not None
    written = json.loads(done.path.read_text())
    assert written == json.loads(json.dumps(done.result.to_dict()))  # the file is the row, nothing added on the way
    assert done.result.distributed["world_size"] == 1 and done.result.settings == {}
    assert list(written)[-2:] == ["settings", "distributed"]  # where version 1 wrote them


def test_the_diagnosis_is_made_and_written_as_its_row(tmp_path: Path, monkeypatch) -> None:
    table = {v: {e: {"status": "ok", "text": "ok"} for e in seed_diagnose.ENGINES} for v in ("maml", "lr")}
    monkeypatch.setattr(seed_diagnose, "run_table", lambda setup, device: table)
    monkeypatch.setattr(seed_diagnose, "run_probes", lambda setup, device: {"p": {"holds": True}})
    monkeypatch.setattr(seed_diagnose, "check_expectations", lambda t: [])
    made = seed_diagnose.diagnose(torch.device("cpu"))
    assert type(made) is DiagnosisResult and made.table == table and made.command == ""
    done = seed_diagnose.run_diagnosis(torch.device("cpu"), "off", tmp_path, "python -m harness diagnose")
    assert type(done.result) is DiagnosisResult and done.result.command == "python -m harness diagnose"
    assert read_row(done.json_path, DiagnosisResult) == done.result
    assert done.md_path.read_text() == markdown(done.result)


def test_a_cells_row_is_made_as_a_cell_row_and_stays_one_in_the_child() -> None:
    assert type(base_row(Cell("maml", "quick"))) is CellRow
    ok = measure_cell_inline(Cell("lr", "cpu-bench", settings=TINY), FAST)
    assert type(ok) is CellRow and ok.status == "ok", ok.message
    assert ok.flags == get_variant("lr").flags and ok.sizes["meta_batch"] == 2 and ok.memory["cpu_peak_alloc_mib"] > 0
    # a fault keeps what was filled in before it: the variant's flags, no sizes (the model never got built)
    bad = measure_cell_inline(Cell("maml", "cpu-bench", settings={**TINY, "model.bogus": 1}), FAST)
    assert type(bad) is CellRow and bad.status == "error" and "bogus" in bad.message and bad.traceback
    assert bad.flags == get_variant("maml").flags and bad.sizes is None and bad.env and bad.wall_s > 0


def test_a_row_filled_step_by_step_refuses_a_field_a_cell_row_does_not_have() -> None:
    row = RowSoFar(base_row(Cell("maml", "quick")))
    row.set(status="ok", message="fine")
    assert (row.row.status, row.row.message) == ("ok", "fine")
    with pytest.raises(TypeError, match="statsu"):
        row.set(statsu="ok")


def test_the_isolated_cell_comes_back_as_the_row_its_process_wrote() -> None:
    row = measure_cell_isolated(Cell("fo", "cpu-bench", settings=TINY), FAST)
    assert type(row) is CellRow and row.status == "ok", row.message
    assert row.distributed["world_size"] == 1 and row.extra == {}  # a field now, where version 1 wrote it


@dataclass
class Typed:
    """An executor returning each cell's row at once, as the local one does (a CellRow)."""

    def measure(self, cell: Cell, opts: MeasureOptions) -> CellRow:
        return replace(base_row(cell), status="ok", env={}, memory={"cpu_peak_alloc_mib": 1.0})


def test_the_matrix_passes_rows_typed_to_the_store_and_back(tmp_path: Path) -> None:
    cells = [Cell("maml", "quick"), Cell("higher:ckpt_fo", "quick")]  # the peer cell: unsupported, no process
    rows = run_matrix(cells, tmp_path / "r", FAST, progress=False, executor=Typed(), extra={"sweep_param": "x"})
    assert [type(r) for r in rows] == [CellRow, CellRow] and [r.status for r in rows] == ["ok", "unsupported"]
    assert all(r.run_id == "r" and r.sweep_param == "x" and r.measure_opts["repeats"] == FAST.repeats for r in rows)
    stored = read_rows(tmp_path / "r")
    assert list(stored.values()) == rows and all(type(r) is CellRow for r in stored.values())
    assert type(lost_cell_row(cells[0], "its worker died")) is CellRow
    with pytest.raises(AttributeError, match="'dict' object has no attribute 'key'"), run_dir_lock(tmp_path / "r"):
        merge_rows(tmp_path / "r", [rows[0].to_dict()], [])  # a dict is no row: the store refuses it
    assert read_rows(tmp_path / "r") == stored  # and nothing was written


def test_a_run_is_turned_into_one_frame_once(tmp_path: Path, monkeypatch) -> None:
    """tables.build: the rows as read -> one cells_frame -> summary.csv and table.md from that frame; the plots
    and sections iterate over its records, never turned back into a frame."""
    run = write_v1(tmp_path).parent
    frames = []
    real = tables.cells_frame

    def once(rows):
        assert all(type(r) is CellRow for r in rows)
        frames.append(real(rows))
        return frames[-1]

    monkeypatch.setattr(tables, "cells_frame", once)
    built = tables.build(run, plots=False)
    assert len(frames) == 1 and built["frame"] is frames[0]
    assert (run / "table.md").read_text() == V1_TABLE  # the run folder's name is the title
    assert (run / "summary.csv").read_text() == tables.summary_csv(frames[0])
    with pytest.raises(AttributeError):
        tables.summary_csv(built["flat"])  # records are no frame: no way back
