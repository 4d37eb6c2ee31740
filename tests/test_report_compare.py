"""Claims: report writes summary.csv, table.md (ratios vs maml) and PNG plots; compare exits 1 with a
per-cell diff when the CPU memory figure rises by more than 5% or the gradient error crosses its
threshold, or when a checked figure is NaN or missing in the new run, 0 otherwise; each regression is
typed (kind, cell, baseline, new, threshold); it warns on different environments; bad input (a
malformed row included) is one line naming the file and line, exit 2."""
from __future__ import annotations

import csv
import math
import json
from pathlib import Path

import pytest

from harness.reporting import tables as report
from harness.bench.cells import Cell, base_row
from harness.reporting.compare import Regression, Thresholds, compare, parse_fail
from harness.reporting.frame import flatten
from harness.core.config import ConfigError
from harness.reporting.files import write_jsonl
from harness.reporting.schema import CellRow
from tests.conftest import cli, harness

ENV = {"python": "3.x", "torch": "2.x", "cuda": None, "cudnn": None, "gpu": None, "driver": None, "cpu": "x86_64",
       "threads": 2, "platform": "linux", "host": "h", "git_commit": "abc", "git_dirty": False, "utc": "now"}


def rows(mem: dict[str, float] | None = None, err: float = 0.0) -> list[dict]:
    out = []
    for i, (v, m) in enumerate((mem or {"maml": 2.0, "fo": 1.0, "ckpt_fo": 0.8, "lr": 2.2}).items()):
        r = base_row(Cell(v, "cpu-bench", settings={"width": 16})).to_dict()  # as the file holds it
        r.update(status="ok", memory={"cpu_peak_alloc_mib": m}, env=dict(ENV), final_query_loss=0.5,
                 time={"median_ms": 10.0 + i, "iqr_ms": 0.5, "min_ms": 9.0, "count": 3, "noisy": False},
                 agreement={"w_rel_err": err, "w_cosine": 1.0, "lr_rel_err": err if "lr" in v else None,
                            "lr_cosine": 1.0 if "lr" in v else None})
        out.append(r)
    return out


def write_run(d: Path, rs: list[dict]) -> Path:
    write_jsonl(d / "cells.jsonl", rs)
    return d


def test_report_tables_and_plots(tmp_path: Path) -> None:
    rs = rows()
    rs.append(base_row(Cell("ckpt", "cpu-bench", settings={"width": 16})).to_dict())
    rs[-1].update(status="oom", message="MemoryError: cap", env=dict(ENV))
    run = write_run(tmp_path / "results" / "r1", rs)
    out = report.build(run)
    table = list(csv.DictReader(out["summary"].open()))
    by = {t["variant"]: t for t in table}
    assert float(by["fo"]["mem_vs_maml"]) == pytest.approx(0.5) and float(by["maml"]["time_vs_maml"]) == 1.0
    assert by["ckpt"]["status"] == "oom" and by["ckpt"]["mem_vs_maml"] == ""
    md = out["table"].read_text()
    assert "| fo |" in md and "0.500x" in md and "MemoryError" in md
    names = sorted(p.name for p in out["plots"])
    assert names == ["grad_error.png", "memory.png", "pareto.png", "time.png"]
    assert all((tmp_path / "results" / "plots" / "r1" / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_sweep_plots(tmp_path: Path) -> None:
    rs = []
    for k in (1, 2, 4):
        for r in rows({"lr": 1.0 * k, "sckpt_lr": 0.5 * k}):
            r["settings"] = {"inner_steps": k}
            r["key"] = Cell(r["variant"], "cpu-bench", settings={"inner_steps": k}).key()
            r["sweep_param"] = "inner_steps"
            rs.append(r)
    out = report.build(write_run(tmp_path / "results" / "s", rs))
    assert sorted(p.name for p in out["plots"]) == ["sweep_memory.png", "sweep_time.png"]


def test_compare_passes_on_identical_and_small_changes(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", rows())
    new = write_run(tmp_path / "new", rows({"maml": 2.09, "fo": 1.0, "ckpt_fo": 0.8, "lr": 2.2}, err=5e-7))
    regressions, warnings, lines = compare(base, new, parse_fail(["mem:5%", "grad:1e-6"]))
    assert regressions == [] and warnings == [] and any("+4.50%" in ln for ln in lines)


def test_compare_fails_when_memory_rises_more_than_5_percent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = write_run(tmp_path / "base", rows())
    new = write_run(tmp_path / "new", rows({"maml": 2.0, "fo": 1.06, "ckpt_fo": 0.8, "lr": 2.2}))
    r = cli(capsys, "compare", str(base), str(new), "--fail", "mem:5%", "--fail", "grad:1e-6")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL fo on cpu-bench [width=16]" in r.stdout and "memory rose +6.00% > 5.00%" in r.stdout
    assert "ckpt_fo" not in r.stdout.split("REGRESSION")[1]


def test_compare_fails_when_the_gradient_error_crosses_its_threshold(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", rows())
    new_rows = rows()
    new_rows[3]["agreement"]["lr_rel_err"] = 2e-6  # lr: LR meta-gradients off
    new = write_run(tmp_path / "new", new_rows)
    regressions, _, _ = compare(base, new, parse_fail(["mem:5%", "grad:1e-6"]))
    assert regressions == [Regression("grad", "lr on cpu-bench [width=16]", 0.0, 2e-6, 1e-6, part="lr")]
    assert str(regressions[0]) == "lr on cpu-bench [width=16]: lr meta-gradient rel. error 2e-06 > 1e-06"
    new_rows[3]["agreement"]["lr_rel_err"] = "nan"  # NaN stored as a string by files._clean
    regressions, _, _ = compare(base, write_run(tmp_path / "new2", new_rows), parse_fail(["grad:1e-6"]))
    assert [(r.kind, r.cell.split()[0], r.part) for r in regressions] == [("grad", "lr", "lr")]
    assert math.isnan(regressions[0].new) and "NaN in the new run" in str(regressions[0])


def test_compare_status_change_missing_cell_and_env_warning(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", rows())
    new_rows = rows()
    new_rows[0].update(status="oom", message="MemoryError")
    del new_rows[1]
    for r in new_rows:
        r["env"]["torch"] = "9.9"
    regressions, warnings, _ = compare(base, write_run(tmp_path / "new", new_rows), Thresholds(mem=0.05))
    assert {(r.kind, r.cell.split()[0], r.baseline, r.new) for r in regressions} == {
        ("status", "maml", "ok", "oom (MemoryError)"), ("missing", "fo", "ok", None)}
    assert "maml on cpu-bench [width=16]: status ok -> oom (MemoryError)" in map(str, regressions)
    assert warnings == ["environments differ: torch: 2.x -> 9.9"]


@pytest.mark.parametrize("expr", ["mem", "mem:x", "speed:5%", "grad:1e-6%", "mem:-1%"])
def test_malformed_fail_lists_accepted(expr: str) -> None:
    with pytest.raises(ConfigError, match="accepted --fail expressions: mem:"):
        parse_fail([expr])


def test_parse_fail() -> None:
    assert parse_fail(["mem:5%", "grad:1e-6", "time:0.2"]) == Thresholds(mem=0.05, grad=1e-6, time=0.2)


def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """In this process; the first case of report and sweep (their canaries) in a fresh one.  compare's fresh-process
    canary is `make regress` (part of `make test`: ``python -m harness compare`` on the committed baseline)."""
    good = write_run(tmp_path / "good", rows())
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    text = (good / "cells.jsonl").read_text()
    (trunc / "cells.jsonl").write_text(text[: len(text) // 2])
    other = write_run(tmp_path / "other", [{**r, "schema": 0} for r in rows()])
    cases = [
        (["compare", str(tmp_path / "missing"), str(good)], "missing/cells.jsonl"),
        (["compare", str(good), str(trunc)], "trunc/cells.jsonl"),
        (["compare", str(other), str(good), "--fail", "mem:5%"], "other/cells.jsonl: line 1 has schema version 0"),
        (["report", str(trunc)], "trunc/cells.jsonl"),
        (["compare", str(good), str(good), "--fail", "mem=5"], "accepted --fail expressions"),
        (["sweep", "--variant", "fo", "--param", "heads=1,2"], "accepted: inner_steps, meta_batch, depth, width"),
    ]
    canaries = {"compare"}
    for args, needle in cases:
        fresh = args[0] not in canaries
        canaries.add(args[0])
        r = harness(*args) if fresh else cli(capsys, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_report_command_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "results" / "r2", rows())
    r = cli(capsys, "report", str(run), "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "| maml |" in r.stdout and (run / "summary.csv").is_file()


def test_sweep_command_writes_scaling_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results"
    r = cli(capsys, "sweep", "--variant", "sckpt_lr", "--param", "inner_steps=1,3", "--device", "cpu", "--set", "width=16",
                "--set", "depth=2", "--set", "task.sequences=2", "--set", "task.tokens=8", "--warmup", "0",
                "--repeats", "1", "--threads", "1", "--out", str(out), "--run-id", "sw")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "sw" / "cells.jsonl").read_text().splitlines()]
    assert [row["settings"]["inner_steps"] for row in rows] == [1, 3] and all(x["status"] == "ok" for x in rows)
    assert rows[1]["memory"]["cpu_peak_alloc_mib"] > rows[0]["memory"]["cpu_peak_alloc_mib"]
    assert (out / "plots" / "sw" / "sweep_memory.png").is_file() and (out / "plots" / "sw" / "sweep_time.png").is_file()


@pytest.mark.parametrize("figure", ["nan", None])
def test_compare_a_nan_or_missing_memory_figure_in_every_new_cell_is_a_regression(
        tmp_path: Path, figure, capsys: pytest.CaptureFixture) -> None:
    base = write_run(tmp_path / "base", rows())
    new_rows = rows()
    for r in new_rows:
        if figure is None:
            r["memory"] = {}
        else:
            r["memory"]["cpu_peak_alloc_mib"] = figure
    new = write_run(tmp_path / "new", new_rows)
    regressions, _, _ = compare(base, new, parse_fail(["mem:5%"]))
    assert [(r.kind, r.threshold, r.baseline) for r in regressions] == [("mem", 0.05, m) for m in (2.0, 1.0, 0.8, 2.2)]
    assert all((math.isnan(r.new) if figure else r.new is None) for r in regressions)
    r = cli(capsys, "compare", str(base), str(new), "--fail", "mem:5%")
    assert r.returncode == 1 and "REGRESSION: 4 problem(s)" in r.stdout, r.stdout + r.stderr
    assert ("NaN in the new run" if figure else "missing in the new run") in r.stdout
    assert compare(base, new, Thresholds())[0] == []  # memory not checked: nothing to fail


def test_compare_a_nan_time_fails_only_the_time_check(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", rows())
    new_rows = rows()
    new_rows[0]["time"]["median_ms"] = float("nan")
    new = write_run(tmp_path / "new", new_rows)
    assert compare(base, new, parse_fail(["mem:5%"]))[0] == []
    (reg,) = compare(base, new, parse_fail(["time:20%"]))[0]
    assert (reg.kind, reg.cell, reg.baseline, reg.threshold) == ("time", "maml on cpu-bench [width=16]", 10.0, 0.2)


@pytest.mark.parametrize("field, value", [("memory", "lots"), ("memory", {"cpu_peak_alloc_mib": "lots"}),
                                          ("status", 3), ("agreement", {"w_rel_err": [1]})])
def test_compare_a_malformed_row_is_exit_2_naming_file_and_line(
        tmp_path: Path, field, value, capsys: pytest.CaptureFixture) -> None:
    good = write_run(tmp_path / "good", rows())
    bad_rows = rows()
    bad_rows[2][field] = value
    bad = write_run(tmp_path / "bad", bad_rows)
    r = cli(capsys, "compare", str(good), str(bad), "--fail", "mem:5%")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"bad/cells.jsonl: line 3: field '{field}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_ratios_are_against_maml_in_the_same_settings_and_missing_without_one() -> None:
    wide = rows({"maml": 4.0, "fo": 1.0})
    for r in wide:
        r["settings"] = {"width": 32}
        r["key"] = Cell(r["variant"], "cpu-bench", settings={"width": 32}).key()
    alone = rows({"fo": 3.0})
    alone[0]["settings"] = {"width": 8}
    typed = [CellRow.from_dict(r) for r in rows({"maml": 2.0, "fo": 1.0}) + wide + alone]
    by = {(f["variant"], f["settings"]): f for f in flatten(typed)}
    assert by[("fo", "width=16")]["mem_vs_maml"] == pytest.approx(0.5)
    assert by[("fo", "width=32")]["mem_vs_maml"] == pytest.approx(0.25)
    assert by[("fo", "width=8")]["mem_vs_maml"] is None  # no maml in its group: no ratio, not a made-up one
