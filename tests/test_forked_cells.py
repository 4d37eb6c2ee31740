"""Claims (issue 24): bench cells forked from the pre-imported cell server (``harness.bench.forked``) keep the
cell contract of a fresh process: a cell that segfaults, aborts, is SIGKILLed or passes its time limit is recorded
with its status (``killed`` naming the signal, ``timeout``), leaves no process behind, and the next cell runs and
measures what a fresh process measures; ``HARNESS_CELL_START=fresh`` selects the fresh interpreter, which still
works; any other value is refused in one line (exit 2).  Not timed tests: the limits are generous.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from harness.bench.cells import Cell
from harness.bench.deathsig import LINUX
from harness.bench.matrix import run_matrix
from harness.cli.main import main
from harness.settings import CELL_START_ENV
from tests.conftest import FAST, REPO, TINY
from tests.test_cells_runtime import gone

pytestmark = pytest.mark.skipif(not LINUX, reason="the cell server forks on Linux only")

# Builders whose cells fail as a process can: each writes its pid first (the test checks it is gone after).
FAULTS_PLUGIN = """
import ctypes, os, signal, time
from harness.bench.cells import BUILDERS

def _pid():
    with open(os.path.join(os.environ["FAULT_PIDS"], str(os.getpid())), "w"):
        pass

def segfault(peer, variant, exp):
    _pid()
    ctypes.string_at(0)  # reads address 0: SIGSEGV

def abort(peer, variant, exp):
    _pid()
    os.abort()

def sigkill(peer, variant, exp):
    _pid()
    os.kill(os.getpid(), signal.SIGKILL)

def hang(peer, variant, exp):
    _pid()
    time.sleep(600)

def parent(peer, variant, exp):  # says which process started the cell: the driver (fresh) or the server (fork)
    raise RuntimeError("started by " + ("driver" if os.getppid() == int(os.environ["FAULT_DRIVER"]) else "server"))

BUILDERS.update(segv=segfault, abort=abort, sigkill=sigkill, hang=hang, parent=parent)
"""
GOOD = Cell("fo", "cpu-bench", settings=TINY)
HANG_LIMIT_S = 5.0  # the hanging cell's time limit; every other cell has FAST's 120 s


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fault builders importable by every cell (``HARNESS_CELL_PLUGINS``); returns where pids are written."""
    (tmp_path / "faultplug.py").write_text(textwrap.dedent(FAULTS_PLUGIN))
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(tmp_path)]))
    monkeypatch.setenv("HARNESS_CELL_PLUGINS", "faultplug")
    monkeypatch.setenv("FAULT_PIDS", str(pids))
    monkeypatch.setenv("FAULT_DRIVER", str(os.getpid()))
    return pids


def _opts(cell: Cell):  # noqa: ANN202
    return replace(FAST, timeout_s=HANG_LIMIT_S) if cell.variant.startswith("hang:") else FAST


def test_a_faulty_forked_cell_is_recorded_and_the_next_cell_runs_as_a_fresh_one(
        faults: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CELL_START_ENV, raising=False)
    fault_cells = [Cell(f"{kind}:fo", "cpu-bench", settings=TINY) for kind in ("segv", "abort", "sigkill", "hang")]
    cells = [Cell("parent:fo", "cpu-bench", settings=TINY)]
    for fault in fault_cells:  # each fault, then a good cell (a new key each time: its seed)
        cells += [fault, replace(GOOD, seed=len(cells))]
    rows = {r.key: r for r in run_matrix(cells, tmp_path / "forked", _opts, progress=False)}
    assert "started by server" in rows[cells[0].key()].message  # the cells were forked, not started fresh
    statuses = {c.variant: (rows[c.key()].status, rows[c.key()].message) for c in fault_cells}
    for variant, signame in (("segv:fo", "SIGSEGV"), ("abort:fo", "SIGABRT"), ("sigkill:fo", "SIGKILL")):
        status, message = statuses[variant]
        assert status == "killed" and signame in message, (variant, message)
    assert statuses["hang:fo"] == ("timeout", f"cell exceeded its time limit of {HANG_LIMIT_S:g} s")
    assert len(list(faults.iterdir())) == 4 and all(gone(int(p.name)) for p in faults.iterdir())
    good = [rows[c.key()] for c in cells[2::2]]
    assert all(r.status == "ok" for r in good), [r.message for r in good]
    monkeypatch.setenv(CELL_START_ENV, "fresh")
    fresh = run_matrix([cells[2]], tmp_path / "fresh", FAST, progress=False)[0]  # the first good cell, fresh
    assert (good[0].memory, good[0].losses, good[0].agreement) == (fresh.memory, fresh.losses, fresh.agreement)
    assert all(row.memory == fresh.memory for row in good)  # the same figure after each fault (other seeds)


def test_forcing_fresh_cells_starts_each_from_the_driver_and_still_records_faults(
        faults: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CELL_START_ENV, "fresh")
    cells = [Cell("parent:fo", "cpu-bench", settings=TINY), Cell("segv:fo", "cpu-bench", settings=TINY), GOOD]
    rows = {r.key: r for r in run_matrix(cells, tmp_path / "r", FAST, progress=False)}
    assert "started by driver" in rows[cells[0].key()].message
    assert rows[cells[1].key()].status == "killed" and "SIGSEGV" in rows[cells[1].key()].message
    assert rows[GOOD.key()].status == "ok"


def test_an_unknown_cell_start_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(CELL_START_ENV, "spawn")
    assert main(["list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CELL_START_ENV in err[0] and "fork, fresh" in err[0], err
