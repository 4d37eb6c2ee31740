"""Claims: the README's and docs' tables that quote committed results are generated blocks equal to what
``python -m harness docs`` writes from results/; a block edited by hand, or a result changed under it, is
caught by ``docs --check`` (exit 1, naming file and line) and rewritten by ``docs``; malformed markers
are one line, exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.core.config import ConfigError
from harness.reporting.docblocks import KINDS, doc_files, drifted, find_blocks, update
from harness.reporting.files import write_cells
from harness.reporting.schema import CellRow, ResultsError
from tests.conftest import REPO, cli, harness


def test_committed_docs_match_the_committed_results() -> None:
    blocks = [b for p in doc_files(REPO) for b in find_blocks(p.read_text(), p)]
    assert {b.kind for b in blocks} == set(KINDS)  # every kind is in use
    assert {b.path.name for b in blocks} >= {"README.md", "checkpointing.md", "diagnosis.md"}
    assert drifted(REPO) == [], "run `python -m harness docs` and commit the result"


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copytree(REPO / "results", tmp_path / "results")
    return tmp_path


def _fo_line(text: str) -> str:
    """The `fo` row of the README's generated variants table (whatever its figures are)."""
    return next(line for line in text.split("\n") if line.startswith("| `fo` | ok | "))


def _edit_by_hand(readme: Path) -> None:
    text = readme.read_text()
    fo = _fo_line(text)
    readme.write_text(text.replace(fo, fo.replace("| `fo` | ok | ", "| `fo` | ok | 3.000 | ", 1)))


def test_a_hand_edited_block_is_caught_and_rewritten(repo_copy: Path, capsys: pytest.CaptureFixture) -> None:
    """``docs --check`` in a fresh process (its exit 1 as a user sees it); the rewrite and re-check in this one."""
    readme = repo_copy / "README.md"
    original = readme.read_text()
    _edit_by_hand(readme)
    assert readme.read_text() != original
    line = 1 + original.split("\n").index("<!-- generated: variants results/cpu-bench-peers -->")
    r = harness("docs", "--check", "--root", str(repo_copy))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"README.md:{line}: generated block 'variants results/cpu-bench-peers' differs" in r.stdout
    r = cli(capsys, "docs", "--root", str(repo_copy))
    assert r.returncode == 0 and readme.read_text() == original
    assert cli(capsys, "docs", "--check", "--root", str(repo_copy)).returncode == 0


def test_a_changed_result_drifts_the_block_that_quotes_it(repo_copy: Path) -> None:
    path = repo_copy / "results" / "sweep-steps-cpu-tokens512" / "cells.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["memory"]["cpu_peak_alloc_mib"] = 218.7
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(d.path.name, d.kind, d.args) for d in drifted(repo_copy)] == [
        ("checkpointing.md", "sweep-memory", ("results/sweep-steps-cpu-tokens512",))]
    assert update(repo_copy) == [repo_copy / "docs" / "checkpointing.md"]
    assert "| 2 | 218.7 | " in (repo_copy / "docs" / "checkpointing.md").read_text() and drifted(repo_copy) == []


@pytest.mark.parametrize("text, says", [
    ("<!-- generated: variants results/x -->\n| a |\n", "doc.md:1: generated block has no '<!-- end generated -->'"),
    ("| a |\n<!-- end generated -->\n", "doc.md:2: '<!-- end generated -->' without a start marker"),
    ("<!-- generated: -->\n<!-- end generated -->\n", "doc.md:1: generated block without a kind; kinds: variants"),
])
def test_malformed_markers_name_file_and_line(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        find_blocks(text, Path("doc.md"))
    assert str(err.value).startswith(says)


@pytest.mark.parametrize("marker, says", [
    ("<!-- generated: plots results/cpu-bench-peers -->", "unknown generated block kind 'plots'; kinds: variants"),
    ("<!-- generated: variants results/nowhere -->", "results/nowhere/cells.jsonl: no such results file"),
    ("<!-- generated: md-table results/diagnosis.md 7 -->", "has 1 table(s), block asks for table '7'"),
])
def test_a_bad_block_is_one_line_exit_2(repo_copy: Path, marker: str, says: str,
                                        capsys: pytest.CaptureFixture) -> None:
    """In this process (the ``docs`` command's fresh-process canary is the hand-edit test's ``docs --check``)."""
    (repo_copy / "docs" / "extra.md").write_text(f"# x\n\n{marker}\n<!-- end generated -->\n")
    readme = repo_copy / "README.md"
    _edit_by_hand(readme)  # a drift
    before = readme.read_text()
    r = cli(capsys, "docs", "--root", str(repo_copy))
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert readme.read_text() == before  # nothing written, not even the good blocks


def _run(root: Path, name: str, paired: dict[str, float]) -> None:
    """A bench run whose cells have the given paired medians (and ``maml``, the reference, none)."""
    rows = [CellRow(key=v, variant=v, preset="cpu-bench", status="ok", memory={"cpu_peak_alloc_mib": 1.5},
                    time={"median_ms": 10.0},
                    paired={"reference": "maml", "clock": "cpu", "median": m, "q1": m * 0.9, "q3": m * 1.1}
                    if m else None)
            for v, m in {"maml": 0.0, **paired}.items()]
    write_cells(root / name / "cells.jsonl", rows)


def test_paired_stability_says_how_far_each_ratio_moved_and_how_many_held_within_ten_percent(tmp_path):
    _run(tmp_path, "quiet", {"fo": 0.5, "lr": 1.0, "vmaml": 2.0})
    _run(tmp_path, "load", {"fo": 0.52, "lr": 0.85, "vmaml": 2.1})
    lines = KINDS["paired-stability"](tmp_path, "quiet", "load")
    assert lines[2] == "| `fo` | `maml` | cpu | 0.500x [0.450-0.550] | 0.520x [0.468-0.572] | +4.0% |"
    assert "| `lr` | `maml` | cpu | 1.000x [0.900-1.100] | 0.850x [0.765-0.935] | -15.0% |" in lines
    assert lines[-1].endswith("| **2 within ±10%, largest 15.0%** |") and lines[-1].startswith("| **3 cells** |")


def test_a_cells_block_shows_the_named_cells_in_order_and_names_a_missing_one(tmp_path):
    _run(tmp_path, "r", {"fo": 0.5, "lr": 1.0})
    lines = KINDS["cells"](tmp_path, "r", "lr,maml")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| `lr`", "| `maml`"]
    assert lines[2] == "| `lr` | ok | 1.5 | 10 | 1.000x [0.900-1.100] vs maml |  |"
    assert len(KINDS["cells"](tmp_path, "r")) == 2 + 3  # no names: every cell
    with pytest.raises(ResultsError, match="no cell vlr; cells: maml, fo, lr"):
        KINDS["cells"](tmp_path, "r", "vlr")
