"""One cell in its own process: launched, awaited, killed, and never left behind.

The process is forked from the pre-imported cell server (:mod:`harness.bench.forked`, Linux) or, as the
fallback, a fresh ``python -m harness.bench.child``; everything below holds for both (a forked cell's death
signal is armed to the server, which dies with the driver).

Why a process per cell: an out-of-memory, a crash or a hang cannot take the matrix down, and every cell
starts from the same allocator state.  What keeps no process or temp folder behind:

* **Timeout** -- the cell runs in its own session (process group); at ``timeout_s`` the whole group gets
  SIGTERM, then SIGKILL (:func:`stop_group`), and the row says ``timeout``.
* **The driver is stopped** -- SIGINT, SIGTERM and SIGHUP all raise :class:`Interrupted` in the driver
  (:func:`signals_as_interrupts`), which kills the cell's group and removes its temp folder on the way out;
  the command exits ``128 + signal`` (130, 143, 129).
* **The driver is SIGKILLed** (nothing runs in it any more) -- the child arms ``prctl(PR_SET_PDEATHSIG,
  SIGTERM)`` at its start (Linux; elsewhere a watchdog thread polls the parent pid), so the kernel sends it
  SIGTERM when the driver dies; its handler removes the cell's temp folder and SIGKILLs its own group
  (:func:`die_with_parent`).  It checks the parent pid right after arming, so a driver that died while the
  child was still importing torch is caught too.
* **Everything a cell starts** (torchrun's agent and its ranks) -- the direct child is started by
  :func:`child_group`: its own session, and ``PR_SET_PDEATHSIG`` armed before it execs
  (:mod:`harness.bench.deathsig`), so even a program that is not ours (torchrun) gets SIGTERM when the
  driver dies; torchrun then stops its ranks (their handlers remove the cell's folder), and the run's temp
  folder, where all of it lives, goes with the driver (:mod:`harness.bench.run_temp`).
* **A signal from outside kills the child** -- the row says ``killed`` with the signal's name (a user, or
  the kernel's OOM killer, which also sends SIGKILL: the harness cannot tell them apart).

Try it: ``python -m harness bench --variants maml --run-id t`` and press Ctrl-C, or ``kill -TERM`` it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from harness.loop import distributed
from harness.bench.cells import Cell, MeasureOptions, base_row
from harness.bench.deathsig import LINUX, STOP_SIGNALS, arm_parent_death_signal, guarded
from harness.bench.forked import CELL_SERVER, ServerUnavailable
from harness.reporting.files import read_row
from harness.reporting.provenance import environment
from harness.reporting.schema import CellRow
from harness.settings import cell_start

__all__ = ["CellExecutor", "LocalExecutor", "fork_cells", "Interrupted", "signals_as_interrupts", "measure_cell_isolated",
           "user_code_paths",
           "die_with_parent", "child_group", "stop_group", "exit_status", "cell_environment", "PARENT_ENV", "CHILD_MODULE", "STOP_GRACE_S", "TEMP_PREFIX"]

REPO = Path(__file__).resolve().parents[2]
CHILD_MODULE = "harness.bench.child"  # python -m harness.bench.child CELL.json OPTS.json ROW.json
PARENT_ENV = "HARNESS_CELL_PARENT"  # the driver's pid, as the child expects to see it
TEMP_PREFIX = "harness-cell-"
STOP_GRACE_S = 5.0  # a stopped cell's group gets SIGTERM, then SIGKILL after this
OOM_MARKERS = ("MemoryError", "bad_alloc", "can't allocate memory", "OutOfMemoryError")


class CellExecutor(Protocol):
    """How a cell's process is launched and awaited; returns the cell's row whatever happens to it."""

    def measure(self, cell: Cell, opts: MeasureOptions) -> CellRow: ...


@dataclass(frozen=True)
class LocalExecutor:
    """One process per cell on this machine (:func:`measure_cell_isolated`): forked from the cell server when
    ``fork`` (and :func:`fork_cells`), else a fresh interpreter."""

    fork: bool = True

    def measure(self, cell: Cell, opts: MeasureOptions) -> CellRow:
        return measure_cell_isolated(cell, opts, fork=self.fork)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP in the driver; ``exit_code`` is ``128 + signal``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum, self.exit_code = signum, 128 + signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_as_interrupts(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise :class:`Interrupted`, as Ctrl-C raises KeyboardInterrupt,
    so the same clean-up runs (main thread only: Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def child_group(cmd: list[str], **popen_kwargs: Any) -> Iterator[subprocess.Popen]:
    """``cmd`` in its own session (a stop of its group ends all it starts), dying with this process
    (:func:`harness.bench.deathsig.guarded`: torchrun too); any exception in the block (a stop, a time-out)
    stops the group first (:func:`stop_group`).  The stop signals wait while it starts, so none comes between
    the fork and this block knowing the child."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS if LINUX else ())  # the launcher unblocks
    try:
        proc = subprocess.Popen(guarded(cmd), start_new_session=True, **popen_kwargs)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a stop that came meanwhile is raised here
        yield proc
    except BaseException:
        stop_group(proc)
        raise


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # already gone
        pass


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """End the process group ``proc`` leads (:func:`child_group`) and reap ``proc``: SIGTERM first, so that
    torchrun's agent stops its ranks (they run in sessions of their own, out of reach of a kill of its group),
    then SIGKILL, after ``grace_s`` at most, to whatever of the group is left."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def exit_status(rc: int, stderr_tail: list[str]) -> tuple[str, str]:
    """(status, message) of a cell process that ended without writing its row."""
    tail = f": {' | '.join(stderr_tail)}" if stderr_tail else ""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:  # a real-time signal without a name
            name = f"signal {-rc}"
        return "killed", (f"cell process killed by signal {-rc} ({name}) from outside the harness "
                          f"(a user, or the kernel's OOM killer){tail}")
    oom = any(m in line for line in stderr_tail for m in OOM_MARKERS)
    return ("oom" if oom else "error"), f"cell process exited with code {rc}{tail}"


def cell_environment(device: str) -> dict[str, Any]:
    """Provenance for a cell's row; a device string torch cannot parse gets the machine's (no device)."""
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return environment(None)
    return environment(device)


def _finished_row(cell: Cell, status: str, message: str, t0: float) -> CellRow:
    return replace(base_row(cell), status=status, message=message, wall_s=time.perf_counter() - t0,
                   env=cell_environment(cell.device))


def user_code_paths(cell: Cell) -> tuple[list[str], str]:
    """(extra ``PYTHONPATH`` entries, working directory) of a cell's process.

    A cell of the user's ``--model``/``--tasks`` runs where the driver runs, with the driver's working directory
    and the ``sys.path`` entries it has beyond the interpreter's own (where ``pkg.module:factory`` was found,
    and a factory reading files next to it finds them); any other cell runs in the repository, as always."""
    if not (cell.model or cell.tasks):
        return [], str(REPO)
    prefixes = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    cwd = os.getcwd()
    extra = [cwd]
    for entry in sys.path:
        path = str(Path(entry or cwd).resolve())
        if path not in extra and path != str(REPO) and Path(path).is_dir() and not path.startswith(prefixes):
            extra.append(path)
    return extra, cwd


def measure_cell_isolated(cell: Cell, opts: MeasureOptions, fork: bool = True) -> CellRow:
    """Measure one cell in a process of its own with a time limit; always a row.  The process is forked from the
    pre-imported cell server (:mod:`harness.bench.forked`) when ``fork`` and :func:`fork_cells` allow it and the
    cell has one rank, else a fresh ``python -m harness.bench.child``; the row is the same either way."""
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        tmpd = Path(tmp)
        (tmpd / "cell.json").write_text(json.dumps(asdict(cell)))
        (tmpd / "opts.json").write_text(json.dumps(asdict(opts)))
        out = tmpd / "row.json"
        paths, cwd = user_code_paths(cell)
        env = {**os.environ, PARENT_ENV: str(os.getpid()),
               "PYTHONPATH": os.pathsep.join([str(REPO), *paths, *filter(None, [os.environ.get("PYTHONPATH")])])}
        ranks = int(cell.settings.get("ranks", 1))
        if ranks > 1:  # the ranks' parent is torchrun's agent (in the cell's group), not this driver
            env.pop(PARENT_ENV)
        argv = [str(tmpd / "cell.json"), str(tmpd / "opts.json"), str(out)]
        t0 = time.perf_counter()
        rc = None
        if fork and ranks == 1 and fork_cells():
            rc = _wait_forked(argv, env, cwd, tmpd / "stderr.txt", opts.timeout_s)
        if rc is None:  # not forked (the fallback): a fresh interpreter
            rc = _wait_fresh(distributed.launcher(ranks) + ["-m", CHILD_MODULE, *argv], env, cwd,
                             tmpd / "stderr.txt", opts.timeout_s)
        if rc == "timeout":
            return _finished_row(cell, "timeout", f"cell exceeded its time limit of {opts.timeout_s:g} s", t0)
        if rc == 0 and out.exists():
            return read_row(out, CellRow)  # the child's row, validated as it is read
        tail = (tmpd / "stderr.txt").read_text(errors="replace").strip().splitlines()[-3:]
        return _finished_row(cell, *exit_status(rc, tail), t0)


def fork_cells() -> bool:
    """Whether cells are forked from the cell server: on Linux unless ``HARNESS_CELL_START=fresh``."""
    return CELL_SERVER is not None and cell_start() == "fork"


def _wait_fresh(cmd: list[str], env: dict[str, str], cwd: str, stderr_path: Path, timeout_s: float) -> int | str:
    """The exit code of ``cmd`` in its own session (process group), or ``"timeout"`` (its group stopped); it dies
    with us, and a Ctrl-C / Interrupted stops it (:func:`child_group`)."""
    with open(stderr_path, "wb") as err, \
            child_group(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd) as proc:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return "timeout"


def _wait_forked(argv: list[str], env: dict[str, str], cwd: str, stderr_path: Path,
                 timeout_s: float) -> int | str | None:
    """As :func:`_wait_fresh`, the cell forked by :data:`~harness.bench.forked.CELL_SERVER`; ``None`` when the
    server cannot fork it (the caller starts it fresh)."""
    deadline = time.monotonic() + timeout_s
    try:
        proc = CELL_SERVER.launch(argv, env, cwd, stderr_path, deadline)
    except ServerUnavailable:
        return None
    except TimeoutError:  # the server was still importing at the cell's time limit
        return "timeout"
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.stop(STOP_GRACE_S)
        return "timeout"
    except BaseException:  # a stop of the driver (Ctrl-C, Interrupted): the cell's group goes first
        proc.stop(STOP_GRACE_S)
        raise


def _end_own_group(cleanup: Callable[[], None]) -> None:
    cleanup()
    if os.getpgrp() == os.getpid():  # we lead our group (start_new_session): end what we started too
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(128 + signal.SIGTERM)


def die_with_parent(parent_pid: int, cleanup: Callable[[], None], *, use_prctl: bool | None = None,
                    on_orphan: Callable[[], None] | None = None, poll_s: float = 0.5) -> str:
    """In the child: when ``parent_pid`` dies (even by SIGKILL), run ``cleanup`` and end this process group.

    SIGTERM and SIGHUP get a handler doing that; on Linux the kernel sends SIGTERM on the parent's death
    (PR_SET_PDEATHSIG), elsewhere a daemon thread polls ``os.getppid()``.  Returns the mechanism used.
    ``on_orphan`` replaces the ending (tests).
    """
    end = on_orphan or (lambda: _end_own_group(cleanup))
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda signum, frame: end())
    use_prctl = LINUX if use_prctl is None else use_prctl
    if use_prctl:
        arm_parent_death_signal()
        if os.getppid() != parent_pid:  # the parent died before the death signal was armed
            end()
        return "prctl"

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        end()

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    return "watchdog"
