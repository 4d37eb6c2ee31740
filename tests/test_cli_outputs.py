"""Claims (issue 11): every command that writes takes the same ``--out DIR`` -- its results under DIR, its plots
under ``DIR/plots/`` (issue 25: beside only the default ``results/``) -- and the commands are thin: none imports another command module."""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from harness.bench import cells as C
from harness.bench import matrix as M
from harness.bench.cells import Cell
from harness.reporting.schema import CellRow
from harness.cli.main import COMMANDS, main
from tests.conftest import REPO, TINY


def fake_cell(cell: Cell, opts: C.MeasureOptions, executor: object = None) -> CellRow:
    return replace(C.base_row(cell), status="ok", env={}, memory={"cpu_peak_alloc_mib": 1.0 + len(cell.variant)},
                   time={"median_ms": 2.0, "iqr_ms": 0.0, "min_ms": 2.0, "count": 1, "noisy": False})


@pytest.mark.parametrize("command", ["bench", "sweep"])
def test_matrix_results_and_plots_go_under_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         command: str) -> None:
    monkeypatch.setattr(M, "measure_cell", fake_cell)
    out = tmp_path / "res"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    argv = (["bench", "--variants", "maml,fo", *sets] if command == "bench"
            else ["sweep", "--variant", "maml", "--param", "inner_steps=1,2", *sets])
    assert main([*argv, "--device", "cpu", "--out", str(out), "--run-id", "r"]) == 0
    assert {p.name for p in (out / "r").iterdir()} >= {"cells.jsonl", "summary.csv", "table.md"}
    assert any((out / "plots" / "r").glob("*.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_run_and_ablate_write_under_out(tmp_path: Path) -> None:
    out = tmp_path / "res"
    assert main(["run", "--variant", "fo", "--device", "cpu", "--meta-steps", "2", "--out", str(out)]) == 0
    assert [p.name for p in (out / "runs").iterdir()] == ["fo_quick_cpu_float32_s0.json"]
    assert main(["ablate", "--preset", "quick", "--variants", "maml", "--meta-steps", "2", "--seeds", "2",
                 "--eval-tasks", "2", "--no-progress", "--jobs", "1", "--run-id", "a", "--out", str(out)]) == 0
    assert (out / "a" / "ablation.csv").is_file() and (out / "plots" / "a" / "learning_curves.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_report_finds_a_run_id_under_out_and_rebuilds_its_plots_under_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "measure_cell", fake_cell)
    out = tmp_path / "res"
    assert main(["bench", "--device", "cpu", "--variants", "maml", "--set", "width=16", "--out", str(out),
                 "--run-id", "r", "--no-plots"]) == 0
    assert not (out / "plots").exists()
    assert main(["report", "r", "--out", str(out)]) == 0
    assert any((out / "plots" / "r").glob("*.png"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_no_command_imports_another_command_or_imports_inside_a_function() -> None:
    commands = {f"harness.cli.{c}" for c in COMMANDS}
    for c in COMMANDS:
        path = REPO / "harness" / "cli" / f"{c}.py"
        assert not (imported_modules(path) & (commands - {f"harness.cli.{c}"})), c
        funcs = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
        assert not [f.name for f in funcs for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))], c
