"""Claims: a matrix keeps its promises under concurrency, signals and faults (issue 13).

* two processes on one run-id keep every row exactly once; the same matrix started twice measures each cell
  once; a held lock is waited for, bounded, then refused in one line naming its holder; a dead process's
  claim is taken over;
* duplicate cells in one request are one measurement; changing only the time limit resumes;
* SIGTERM/SIGHUP stop a matrix as Ctrl-C does (exit 143/129); SIGTERM or SIGKILL of a ``bench`` driver
  leaves no cell process and no ``harness-cell-*`` temp folder;
* statuses say what happened: ``killed`` for a signal from outside, ``oom`` for a failed huge allocation.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from harness.bench import store
from harness.bench.cells import Cell, base_row
from harness.bench.child import measure_cell_inline
from harness.bench.matrix import is_finished, matrix_exit_code, run_matrix
from harness.bench.process import Interrupted, die_with_parent, exit_status, measure_cell_isolated, \
    signals_as_interrupts
from harness.bench.store import RunDirBusy, claim_cell, run_dir_lock
from harness.reporting.files import read_cells
from harness.reporting.schema import CellRow
from tests.conftest import FAST, REPO, TINY
from tests.test_cells import FakeExecutor, bench_args

# A builder plugin whose cells announce their pid and then hang: a cell that is surely running.
SLOW_PLUGIN = """
import os, time
from harness.bench.cells import BUILDERS

def hang(peer, variant, exp):
    open(os.environ["SLOW_STARTED"], "w").write(str(os.getpid()))
    time.sleep(600)

BUILDERS["slow"] = hang
"""

# run_matrix in its own process with an executor that takes a while and logs every measurement
MATRIX_PROC = """
import os, sys, time
from dataclasses import replace
from harness.bench.cells import Cell, base_row
from harness.bench.matrix import run_matrix
from tests.conftest import FAST

class Slow:
    def measure(self, cell, opts):
        with open(sys.argv[2], "a") as log:
            log.write(cell.variant + "\\n")
        time.sleep(0.1)
        return replace(base_row(cell), status="ok", env={})

run_matrix([Cell(v, "quick") for v in sys.argv[3].split(",")], sys.argv[1], FAST, progress=False, executor=Slow())
"""


def env_with(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *extra.pop("path", "").split(os.pathsep)]),
            **extra}


def start_matrix(run_dir: Path, log: Path, variants: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MATRIX_PROC, str(run_dir), str(log), variants], cwd=REPO,
                            env=env_with(), stderr=subprocess.PIPE, text=True)


def test_two_processes_with_different_cells_on_one_run_id_keep_every_row_once(tmp_path: Path) -> None:
    a = ",".join(f"a{i}" for i in range(8))
    b = ",".join(f"b{i}" for i in range(8))
    procs = [start_matrix(tmp_path / "r", tmp_path / "log", v) for v in (a, b)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    variants = [r.variant for r in read_cells(tmp_path / "r")]
    assert sorted(variants) == sorted(a.split(",") + b.split(","))  # every row, exactly once


def test_the_same_matrix_started_twice_measures_each_cell_once(tmp_path: Path) -> None:
    cells = ",".join(f"c{i}" for i in range(10))
    procs = [start_matrix(tmp_path / "r", tmp_path / "log", cells) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    measured = (tmp_path / "log").read_text().split()
    assert sorted(measured) == sorted(cells.split(","))  # one measurement per cell, shared between the two
    assert sorted(r.variant for r in read_cells(tmp_path / "r")) == sorted(cells.split(","))


def test_two_bench_commands_on_one_run_id_keep_both_rows(tmp_path: Path) -> None:
    out = tmp_path / "results"
    procs = [subprocess.Popen([sys.executable, "-m", "harness", *bench_args(out, v)], cwd=REPO, env=env_with(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("maml", "fo")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert sorted(r.variant for r in read_cells(out / "r")) == ["fo", "maml"]


def test_a_held_lock_is_waited_for_then_refused_naming_its_holder(tmp_path: Path) -> None:
    with run_dir_lock(tmp_path / "r"):
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy, match=f"locked by pid {os.getpid()} on host .* \\(waited 0.3 s\\)"):
            run_matrix([Cell("maml", "quick")], tmp_path / "r", FAST, progress=False, lock_wait_s=0.3,
                       executor=FakeExecutor())
        assert time.monotonic() - t0 >= 0.3
    rows = run_matrix([Cell("maml", "quick")], tmp_path / "r", FAST, progress=False, executor=FakeExecutor())
    assert [r.status for r in rows] == ["ok"]  # released: the next run goes through


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_claim_of_a_dead_process_is_taken_over_and_a_live_one_awaited(tmp_path: Path, monkeypatch) -> None:
    run_dir, fake = tmp_path / "r", FakeExecutor()
    cells = [Cell("maml", "quick"), Cell("fo", "quick")]
    monkeypatch.setattr(store.os, "getpid", dead_pid)  # the claims below are written as by a process now dead
    with run_dir_lock(run_dir):
        claim_cell(run_dir, cells[0].key(), 60)
    monkeypatch.undo()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live holder of "fo"
    monkeypatch.setattr(store.os, "getpid", lambda: other.pid)
    with run_dir_lock(run_dir):
        claim_cell(run_dir, cells[1].key(), 60)
    monkeypatch.undo()

    said: list[str] = []

    def finish_fo() -> None:  # once this run waits for it, the other process writes its row, then ends
        wait_for(lambda: said)
        row = replace(base_row(cells[1]), status="ok", env={}, measure_opts=FAST.__dict__ | {}, extra={"by": "other"})
        with run_dir_lock(run_dir):
            store.merge_rows(run_dir, [row], [])
        other.kill()
        other.wait()

    threading.Thread(target=finish_fo).start()
    rows = run_matrix(cells, run_dir, FAST, progress=False, executor=fake, log=said.append)
    assert said == [f"waiting for 1 cell(s) another process is measuring in {run_dir}"]
    assert fake.ran == ["maml"]  # the dead one's cell measured here; the live one's awaited, not re-measured
    assert [r.variant for r in rows] == ["maml", "fo"] and rows[1].extra.get("by") == "other"


def test_duplicate_cells_in_one_request_are_one_measurement(tmp_path: Path) -> None:
    fake, said = FakeExecutor(), []
    cells = [Cell("maml", "quick"), Cell("fo", "quick"), Cell("maml", "quick", settings={})]
    rows = run_matrix(cells, tmp_path / "r", FAST, progress=False, executor=fake, log=said.append)
    assert fake.ran == ["maml", "fo"] and [r.variant for r in rows] == ["maml", "fo"]
    assert "collapsed 1 duplicate cell(s)" in said[0]


def test_changing_only_the_time_limit_resumes(tmp_path: Path) -> None:
    fake = FakeExecutor()
    cells = [Cell("maml", "quick"), Cell("fo", "quick")]
    run_matrix(cells, tmp_path / "r", FAST, progress=False, executor=fake)
    run_matrix(cells, tmp_path / "r", replace(FAST, timeout_s=7), progress=False, executor=fake)
    assert fake.ran == ["maml", "fo"]  # the second run measured nothing
    timed_out = replace(base_row(cells[0]), status="timeout", measure_opts=FAST.__dict__)
    assert is_finished(timed_out, FAST) and is_finished(timed_out, replace(FAST, timeout_s=1))
    assert not is_finished(timed_out, replace(FAST, timeout_s=FAST.timeout_s * 2))  # a longer limit re-runs it


def test_exit_code_of_a_matrix() -> None:
    def rows(*statuses: str) -> list[CellRow]:
        return [CellRow(status=s) for s in statuses]

    assert matrix_exit_code(rows("ok", "unsupported", "ok")) == 0
    for bad in ("oom", "killed", "error", "timeout", "diverged"):
        assert matrix_exit_code(rows("ok", bad)) == 1, bad


def test_sighup_and_sigterm_stop_a_matrix_like_ctrl_c() -> None:
    for sig, code in ((signal.SIGHUP, 129), (signal.SIGTERM, 143)):
        before = signal.getsignal(sig)
        with pytest.raises(KeyboardInterrupt) as info:
            with signals_as_interrupts():
                os.kill(os.getpid(), sig)
                time.sleep(5)
        assert isinstance(info.value, Interrupted) and info.value.exit_code == code
        assert signal.getsignal(sig) is before  # restored


def slow_cell_env(tmp_path: Path) -> dict:
    (tmp_path / "slowplug.py").write_text(textwrap.dedent(SLOW_PLUGIN))
    (tmp_path / "tmp").mkdir()
    return {"path": str(tmp_path), "HARNESS_CELL_PLUGINS": "slowplug", "SLOW_STARTED": str(tmp_path / "started"),
            "TMPDIR": str(tmp_path / "tmp")}


def wait_for(predicate, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")  # zombie: dead
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_stopping_a_bench_driver_leaves_no_process_and_no_temp_folder(tmp_path: Path, sig: int, code: int) -> None:
    extra = slow_cell_env(tmp_path)
    driver = subprocess.Popen([sys.executable, "-m", "harness", *bench_args(tmp_path / "out", "slow:maml")],
                              cwd=REPO, env=env_with(**extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    wait_for(lambda: (tmp_path / "started").exists() and (tmp_path / "started").read_text())
    child = int((tmp_path / "started").read_text())
    assert list((tmp_path / "tmp").rglob("harness-cell-*"))  # the cell's temp folder exists while it runs
    driver.send_signal(sig)
    assert driver.wait(timeout=60) == code, driver.stderr.read()
    wait_for(lambda: gone(child), timeout=30)  # SIGKILL: the child's death signal ended it
    wait_for(lambda: not list((tmp_path / "tmp").iterdir()), timeout=30)


def test_a_cell_killed_from_outside_is_killed_not_oom(tmp_path: Path, monkeypatch) -> None:
    extra = slow_cell_env(tmp_path)
    for k, v in env_with(**extra).items():
        monkeypatch.setenv(k, v)
    result: dict[str, CellRow] = {}
    t = threading.Thread(target=lambda: result.update(row=measure_cell_isolated(Cell("slow:maml", "quick"), FAST)))
    t.start()
    wait_for(lambda: (tmp_path / "started").exists() and (tmp_path / "started").read_text())
    os.kill(int((tmp_path / "started").read_text()), signal.SIGKILL)
    t.join(timeout=60)
    row = result["row"]
    assert row.status == "killed" and "SIGKILL" in row.message, row.message


def test_a_failed_huge_cpu_allocation_is_oom() -> None:
    row = measure_cell_inline(Cell("maml", "cpu-bench", settings={**TINY, "width": 2 ** 34}), FAST)
    assert row.status == "oom" and "can't allocate memory" in row.message, row.message


def test_how_a_cell_process_ended_names_its_status() -> None:
    assert exit_status(-signal.SIGKILL, [])[0] == "killed" and "SIGKILL" in exit_status(-9, [])[1]
    assert exit_status(1, ["Traceback", "MemoryError"]) [0] == "oom"
    assert exit_status(1, ["terminate called after throwing an instance of 'std::bad_alloc'"])[0] == "oom"
    status, message = exit_status(3, ["ValueError: boom"])
    assert status == "error" and "code 3" in message and "boom" in message


def test_a_child_notices_its_parents_death_without_prctl() -> None:
    """The watchdog thread (other platforms than Linux): a parent pid that is not ours any more ends us."""
    ended = threading.Event()
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        assert die_with_parent(dead_pid(), lambda: None, use_prctl=False, on_orphan=ended.set, poll_s=0.01) \
            == "watchdog"
        assert ended.wait(5)
        ended.clear()
        assert die_with_parent(os.getppid(), lambda: None, use_prctl=False, on_orphan=ended.set, poll_s=0.01) \
            == "watchdog"
        assert not ended.wait(0.2)  # our parent is alive: nothing happens
        os.kill(os.getpid(), signal.SIGHUP)  # a hang-up of the child ends it as its parent's death does
        assert ended.wait(5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
