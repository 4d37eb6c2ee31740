"""Issue 25, cases 1-4: the regression gate catches every regression.

* ``compare`` reads exactly the files it is given (two ``.jsonl`` files in one folder are two runs);
* rows are matched by the full identity of a cell (ranks, device and precision included) and a run that holds
  two rows of one cell is refused, so no row hides another's regression;
* a non-finite or impossible figure (a negative or infinite gradient error, a zero median time or a NaN memory
  figure in the baseline) is a failure with its reason, never a skipped check;
* ``report`` refuses a run with a duplicated row, naming the cell.

    python -m pytest tests/test_compare_gate.py
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from harness.bench.cells import Cell, base_row
from harness.cli.main import main
from harness.reporting import tables as report
from harness.reporting.compare import Thresholds, compare
from harness.reporting.files import write_jsonl
from harness.reporting.schema import ResultsError
from tests.test_report_compare import ENV, rows

GATE = Thresholds(mem=0.05, grad=1e-6, time=0.2)


def _row(variant: str, mem: float, **settings) -> dict:
    r = base_row(Cell(variant, "cpu-bench", settings={"width": 16, **settings})).to_dict()  # as the file holds it
    r.update(status="ok", memory={"cpu_peak_alloc_mib": mem}, env=dict(ENV), final_query_loss=0.5,
             time={"median_ms": 10.0, "iqr_ms": 0.5, "min_ms": 9.0, "count": 3, "noisy": False},
             agreement={"w_rel_err": 0.0, "w_cosine": 1.0, "lr_rel_err": None, "lr_cosine": None})
    return r


def test_compare_reads_exactly_the_files_it_is_given(tmp_path: Path, capsys) -> None:
    write_jsonl(tmp_path / "old.jsonl", rows())
    write_jsonl(tmp_path / "new.jsonl", rows({"maml": 4.0, "fo": 1.0, "ckpt_fo": 0.8, "lr": 2.2}))
    write_jsonl(tmp_path / "cells.jsonl", rows())  # what both were read as before
    code = main(["compare", str(tmp_path / "old.jsonl"), str(tmp_path / "new.jsonl"), "--fail", "mem:5%"])
    assert code == 1 and "maml on cpu-bench [width=16]: memory rose +100.00%" in capsys.readouterr().out


@pytest.mark.parametrize("other", [{"ranks": 2}, {"amp": "bf16"}])
def test_rows_of_one_cell_that_differ_in_ranks_or_precision_are_compared_separately(tmp_path: Path, other) -> None:
    base = [_row("maml", 2.0), _row("maml", 2.0, **other)]
    new = [_row("maml", 2.0), _row("maml", 4.0, **other)]
    write_jsonl(tmp_path / "b" / "cells.jsonl", base)
    write_jsonl(tmp_path / "n" / "cells.jsonl", new)
    bad = compare(tmp_path / "b", tmp_path / "n", GATE).regressions
    assert [(r.kind, r.new) for r in bad] == [("mem", 4.0)]


def test_a_cuda_row_and_a_cpu_row_of_one_cell_are_two_cells(tmp_path: Path) -> None:
    cpu, cuda = _row("maml", 2.0), _row("maml", 2.0)
    cuda_cell = Cell("maml", "cpu-bench", device="cuda", settings={"width": 16})
    cuda.update(key=cuda_cell.key(), device="cuda")
    grown = copy.deepcopy(cuda)
    grown["memory"]["cpu_peak_alloc_mib"] = 4.0
    write_jsonl(tmp_path / "b" / "cells.jsonl", [cpu, cuda])
    write_jsonl(tmp_path / "n" / "cells.jsonl", [cpu, grown])
    assert [r.kind for r in compare(tmp_path / "b", tmp_path / "n", GATE).regressions] == ["mem"]


def test_a_run_with_two_rows_of_one_cell_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    write_jsonl(tmp_path / "b" / "cells.jsonl", [_row("maml", 2.0)])
    write_jsonl(tmp_path / "n" / "cells.jsonl", [_row("maml", 2.0), _row("maml", 4.0)])
    with pytest.raises(ResultsError, match=r"two rows of one cell \(maml on cpu-bench \[width=16\]\)"):
        compare(tmp_path / "b", tmp_path / "n", GATE)
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "n")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(("where", "change", "reason"), [
    ("new", lambda r: r["agreement"].update(w_rel_err=-math.inf), "rel. error -inf is not a finite number >= 0"),
    ("new", lambda r: r["agreement"].update(w_rel_err=-5.0), "rel. error -5.0 is not a finite number >= 0"),
    ("new", lambda r: r["agreement"].update(w_rel_err=math.inf), "rel. error inf is not a finite number >= 0"),
    ("base", lambda r: r["time"].update(median_ms=0.0), "baseline median time 0.0 ms"),
    ("base", lambda r: r["memory"].update(cpu_peak_alloc_mib=math.nan), "baseline memory figure cpu_peak_alloc_mib"),
    ("new", lambda r: r["memory"].update(cpu_peak_alloc_mib=-1.0), "is negative"),
])
def test_an_impossible_figure_is_a_failure_with_its_reason(tmp_path: Path, where, change, reason) -> None:
    base, new = [_row("maml", 2.0)], [_row("maml", 2.0)]
    change((base if where == "base" else new)[0])
    write_jsonl(tmp_path / "b" / "cells.jsonl", base)
    write_jsonl(tmp_path / "n" / "cells.jsonl", new)
    bad = compare(tmp_path / "b", tmp_path / "n", GATE).regressions
    assert [r.kind for r in bad] == ["invalid"] and reason in str(bad[0]), [str(r) for r in bad]


def test_report_refuses_a_duplicated_row_naming_the_cell(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "r" / "cells.jsonl", [_row("maml", 2.0), _row("fo", 1.0), _row("maml", 2.0)])
    with pytest.raises(ResultsError, match=r"two rows of one cell \(maml on cpu-bench \[width=16\]\)"):
        report.build(tmp_path / "r")
