"""A results directory shared safely: its rows, its lock, and the cells being measured in it.

Several ``bench``/``sweep`` processes may write one ``results/<run-id>/`` at once (two variants lists on
one run-id, the same matrix started twice).  Three rules keep every row, exactly once:

* **The lock** (:func:`run_dir_lock`): ``<run-dir>/.lock``, an exclusive ``flock`` held for milliseconds
  around each read-merge-replace of ``cells.jsonl`` and each claim.  The file holds the holder's pid and
  host for the message a waiter prints.  A holder that dies, even by SIGKILL, releases it: the kernel drops
  a ``flock`` with its process, so a stale lock cannot block; the dead holder's pid left in the file is just
  overwritten.  A waiter gives up after ``wait_s`` (one line naming the holder, exit 2).
* **Merge, never overwrite** (:func:`merge_rows`): under the lock the file is re-read, the new rows
  replace those with the same key, every other row stays, and the file is replaced atomically.
* **Claims** (:func:`claim_cell`): before measuring a cell a process writes
  ``<run-dir>/.running/<hash>.json`` (pid, host, deadline).  Another process that finds a live claim waits
  for that row instead of measuring the cell again; a claim whose pid is dead on this host, or whose
  deadline (start + the cell's time limit + a grace) passed, is stale and taken over.

Try it: start ``python -m harness bench --variants maml --run-id same`` and
``python -m harness bench --variants fo --run-id same`` together; ``results/same/cells.jsonl`` has both.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.core.config import ConfigError
from harness.reporting.files import load_rows, write_cells, write_text_atomic
from harness.reporting.schema import ResultsError

__all__ = ["ResultsError", "RunDirBusy", "CELLS_FILE", "LOCK_WAIT_S", "load_rows", "read_rows", "run_dir_lock",
           "merge_rows", "claim_cell", "release_cell", "live_claim", "pid_alive"]

CELLS_FILE = "cells.jsonl"
LOCK_FILE = ".lock"
CLAIMS_DIR = ".running"
LOCK_WAIT_S = 60.0  # the lock is held for milliseconds; a minute means its holder is stuck
CLAIM_GRACE_S = 60.0  # beyond the cell's time limit, before a claim of a live-looking holder is stale
HOST = socket.gethostname()


class RunDirBusy(ConfigError):
    """Another process held a results directory's lock longer than we would wait (one line, exit 2)."""


def read_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``run_dir``'s rows by key, in file order; none yet is an empty dict (a bad file is :class:`ResultsError`)."""
    path = Path(run_dir) / CELLS_FILE
    if not path.exists():
        return {}
    return {r["key"]: r for r in load_rows(path)}


def pid_alive(pid: int, host: str) -> bool:
    """Whether ``pid`` on ``host`` may still run: another host's process is assumed alive."""
    if host != HOST:
        return True
    if pid <= 0:  # not a process id (os.kill would address a group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"pid {info['pid']} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def run_dir_lock(run_dir: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the directory); :class:`RunDirBusy` after ``wait_s`` of waiting."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # held by another open file (process): wait, bounded
                if time.monotonic() > deadline:
                    raise RunDirBusy(f"{run_dir} is locked by {_holder(fd)} (waited {wait_s:g} s); "
                                     "wait for it to finish or use another --run-id") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST, "since": time.time()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the pid/host of a holder that is gone would only mislead
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def merge_rows(run_dir: Path, new: list[dict[str, Any]], order: list[str]) -> dict[str, dict[str, Any]]:
    """Under the lock: re-read, replace rows by key, keep all others, replace atomically; returns all rows.

    The file lists ``order``'s keys first (the caller's matrix order), then the others in file order.
    """
    rows = read_rows(run_dir)
    rows.update({r["key"]: r for r in new})
    ranked = {k: i for i, k in enumerate(order)}
    keys = sorted(rows, key=lambda k: ranked.get(k, len(ranked)))  # stable: the others keep file order
    write_cells(Path(run_dir) / CELLS_FILE, [rows[k] for k in keys])  # each row validated as a CellRow
    return rows


def _claim_path(run_dir: Path, key: str) -> Path:
    return Path(run_dir) / CLAIMS_DIR / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".json")


def live_claim(run_dir: Path, key: str) -> dict[str, Any] | None:
    """Under the lock: the claim of another live process on ``key``, or ``None`` (no claim, or a stale one)."""
    path = _claim_path(run_dir, key)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    mine = info.get("pid") == os.getpid() and info.get("host") == HOST
    stale = not pid_alive(int(info.get("pid", -1)), str(info.get("host"))) or time.time() > info.get("deadline", 0)
    return None if mine or stale else info


def claim_cell(run_dir: Path, key: str, timeout_s: float) -> dict[str, Any] | None:
    """Under the lock: claim ``key`` for this process; returns the other live holder's claim instead if any."""
    other = live_claim(run_dir, key)
    if other is not None:
        return other
    info = {"pid": os.getpid(), "host": HOST, "key": key, "deadline": time.time() + timeout_s + CLAIM_GRACE_S}
    write_text_atomic(_claim_path(run_dir, key), json.dumps(info))
    return None


def release_cell(run_dir: Path, key: str) -> None:
    """Under the lock: drop this process's claim on ``key`` (another's is left alone)."""
    path = _claim_path(run_dir, key)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if info.get("pid") == os.getpid() and info.get("host") == HOST:
        path.unlink(missing_ok=True)
