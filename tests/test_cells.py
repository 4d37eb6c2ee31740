"""Claims: every cell runs isolated with a status (ok/oom/error/timeout/unsupported), the matrix goes on
after a fault, results carry provenance, and re-running resumes (skips finished cells unless --force)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from harness.bench import cells as C
from harness.bench.cells import Cell, MeasureOptions
from harness.bench.child import measure_cell_inline
from harness.bench.matrix import measure_cell, run_matrix
from harness.reporting.files import read_cells
from harness.reporting.schema import CellRow
from tests.conftest import FAST, TINY, harness


@dataclass
class FakeExecutor:
    """Records the cells it is asked to measure and returns an ``ok`` row at once."""

    ran: list[str] = field(default_factory=list)
    status: str = "ok"

    def measure(self, cell: Cell, opts: MeasureOptions) -> CellRow:
        self.ran.append(cell.variant)
        return replace(C.base_row(cell), status=self.status, env={})


def bench_args(out: Path, variants: str, *extra: str) -> list[str]:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return ["bench", "--device", "cpu", "--variants", variants, *sets, "--warmup", "0", "--repeats", "1",
            "--threads", "1", "--out", str(out), "--run-id", "r", "--no-plots", *extra]


@pytest.mark.slow  # minutes: `make test-slow` (CI runs it)
def test_oom_cell_is_recorded_and_the_matrix_goes_on_then_resumes(tmp_path: Path) -> None:
    out = tmp_path / "results"
    r = harness(*bench_args(out, "maml,ckpt_fo", "--cpu-mem-cap", "maml=0.001"))
    assert r.returncode == 1, r.stderr  # an oom cell fails the matrix (exit 1), after every cell ran
    rows = {row.variant: row for row in read_cells(out / "r")}
    assert rows["maml"].status == "oom" and "MemoryError" in rows["maml"].message
    ok = rows["ckpt_fo"]
    assert ok.status == "ok" and ok.memory["cpu_peak_alloc_mib"] > 0 and ok.time["count"] == 1
    assert ok.agreement["w_rel_err"] == 0.0 and ok.agreement["lr_rel_err"] is None
    assert ok.flags["layer_ckpt"] and ok.final_query_loss is not None
    for key in ("python", "torch", "cuda", "cudnn", "gpu", "driver", "host", "git_commit", "git_dirty", "utc"):
        assert key in ok.env
    for name in ("summary.csv", "table.md"):
        assert (out / "r" / name).is_file()

    # an interrupted run: one finished row is missing; the re-run completes only that cell
    path = out / "r" / "cells.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[1] + "\n")
    r = harness(*bench_args(out, "maml,ckpt_fo", "--cpu-mem-cap", "maml=0.001"))
    assert r.returncode == 1, r.stderr
    assert "skipping 1 finished cell(s), running 1" in r.stderr
    again = {row.variant: row for row in read_cells(out / "r")}
    assert again["ckpt_fo"].env["utc"] == ok.env["utc"]  # untouched
    assert again["maml"].status == "oom"
    assert [row.variant for row in read_cells(out / "r")] == ["maml", "ckpt_fo"]  # matrix order kept


def test_resume_and_force_with_a_fake_cell(tmp_path: Path) -> None:
    fake = FakeExecutor()
    cells = [Cell(v, "quick") for v in ("maml", "fo", "lr")]
    run_matrix(cells[:2], tmp_path / "x", FAST, progress=False, executor=fake)
    run_matrix(cells, tmp_path / "x", FAST, progress=False, executor=fake)
    assert fake.ran == ["maml", "fo", "lr"]
    run_matrix(cells, tmp_path / "x", FAST, progress=False, force=True, executor=fake)
    assert fake.ran[3:] == ["maml", "fo", "lr"]
    assert [r.variant for r in read_cells(tmp_path / "x")] == ["maml", "fo", "lr"]
    assert not list((tmp_path / "x").glob(".*tmp"))  # atomic writes leave no temporary files
    # other measurement options are not the same measurement: those cells run again
    run_matrix(cells, tmp_path / "x", replace(FAST, repeats=2), progress=False, executor=fake)
    assert fake.ran[6:] == ["maml", "fo", "lr"]


def test_timeout_marks_the_cell(tmp_path: Path) -> None:
    row = measure_cell(Cell("maml", "quick"), MeasureOptions(timeout_s=0.2))
    assert row.status == "timeout" and "0.2 s" in row.message and row.env["git_commit"] is not None


def test_exception_is_an_error_with_its_message() -> None:
    row = measure_cell_inline(Cell("maml", "cpu-bench", settings={**TINY, "model.bogus": 1}), FAST)
    assert row.status == "error" and "TypeError" in row.message and "bogus" in row.message


def test_inline_cell_ok_and_unknown_peer_unsupported() -> None:
    row = measure_cell_inline(Cell("ckpt_lr", "cpu-bench", settings={**TINY, "inner_steps": 1}), FAST)
    assert row.status == "ok", row.message
    assert row.sizes["inner_steps"] == 1 and row.agreement["lr_rel_err"] is not None
    row = measure_cell_inline(Cell("nopeer:maml", "quick"), FAST)
    assert row.status == "unsupported" and "nopeer" in row.message


def test_pluggable_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def build(peer, variant, exp):
        seen["args"] = (peer, variant.name)
        other = copy.deepcopy(exp.learner)  # any object with meta_gradients/step/parameters: here a
        other.cfg = replace(other.cfg, first_order=False)  # second-order learner, compared against FOMAML
        return other

    monkeypatch.setitem(C.BUILDERS, "mine", build)
    row = measure_cell_inline(Cell("mine:fo", "cpu-bench", settings=TINY), FAST)
    assert seen["args"] == ("mine", "fo")
    assert row.status == "ok", row.message
    assert row.agreement["w_rel_err"] > 1e-3  # the builder's learner is the one measured and compared


def test_cells_file_errors(tmp_path: Path) -> None:
    with pytest.raises(C.ResultsError, match="no such results file"):
        read_cells(tmp_path / "missing")
    bad = tmp_path / "cells.jsonl"
    bad.write_text(json.dumps({"schema": 1, "key": "k", "variant": "maml", "status": "ok"}) + "\n{\"schema\": 1, \"ke")
    with pytest.raises(C.ResultsError, match="truncated"):
        read_cells(bad)
    bad.write_text(json.dumps({"schema": 99, "key": "k", "variant": "maml", "status": "ok"}) + "\n")
    with pytest.raises(C.ResultsError, match="schema version 99"):
        read_cells(tmp_path)
