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
from tests.conftest import REPO, harness


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


def test_a_hand_edited_block_is_caught_and_rewritten(repo_copy: Path) -> None:
    readme = repo_copy / "README.md"
    original = readme.read_text()
    assert "| `fo` | ok | 3.547 | 0.406x |" in original
    readme.write_text(original.replace("| `fo` | ok | 3.547 | 0.406x |", "| `fo` | ok | 3.000 | 0.343x |"))
    line = 1 + original.split("\n").index("<!-- generated: variants results/cpu-bench-peers -->")
    r = harness("docs", "--check", "--root", str(repo_copy))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"README.md:{line}: generated block 'variants results/cpu-bench-peers' differs" in r.stdout
    r = harness("docs", "--root", str(repo_copy))
    assert r.returncode == 0 and readme.read_text() == original
    assert harness("docs", "--check", "--root", str(repo_copy)).returncode == 0


def test_a_changed_result_drifts_the_block_that_quotes_it(repo_copy: Path) -> None:
    path = repo_copy / "results" / "sweep-steps-cpu-tokens512" / "cells.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["memory"]["cpu_peak_alloc_mib"] *= 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(d.path.name, d.kind, d.args) for d in drifted(repo_copy)] == [
        ("checkpointing.md", "sweep-memory", ("results/sweep-steps-cpu-tokens512",))]
    assert update(repo_copy) == [repo_copy / "docs" / "checkpointing.md"]
    assert "| 2 | 218.7 | 99.22 |" in (repo_copy / "docs" / "checkpointing.md").read_text() and drifted(repo_copy) == []


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
def test_a_bad_block_is_one_line_exit_2(repo_copy: Path, marker: str, says: str) -> None:
    (repo_copy / "docs" / "extra.md").write_text(f"# x\n\n{marker}\n<!-- end generated -->\n")
    readme = repo_copy / "README.md"
    readme.write_text(readme.read_text().replace("| `fo` | ok | 3.547 |", "| `fo` | ok | 3.000 |"))  # a drift
    before = readme.read_text()
    r = harness("docs", "--root", str(repo_copy))
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert readme.read_text() == before  # nothing written, not even the good blocks
