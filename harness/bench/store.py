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
  deadline (start + the cell's time limit + a grace) passed, is stale and taken over.  A malformed claim
  (not a JSON object with an integer pid, a host and a finite deadline) is refused, naming its file
  (:func:`check_claims` looks at every claim before a run's first cell).
* **No link followed**: ``.lock`` is opened with ``O_NOFOLLOW`` and must be a plain file; ``.running`` is
  opened with ``O_NOFOLLOW`` and claims are read, written (by the one writer,
  :func:`harness.reporting.files.write_atomic`: a fresh ``O_EXCL`` temp file renamed over the claim) and
  removed relative to it.  A symlink in either place is refused (one line, exit 2); its target
  is never touched.

Try it: start ``python -m harness bench --variants maml --run-id same`` and
``python -m harness bench --variants fo --run-id same`` together; ``results/same/cells.jsonl`` has both.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.core.config import ConfigError
from harness.reporting.files import read_cells, write_atomic, write_cells
from harness.reporting.schema import CellRow, ResultsError

__all__ = ["ResultsError", "RunDirBusy", "CELLS_FILE", "LOCK_WAIT_S", "read_rows", "run_dir_lock",
           "merge_rows", "check_claims", "claim_cell", "parse_claim", "release_cell", "live_claim", "pid_alive"]

CELLS_FILE = "cells.jsonl"
LOCK_FILE = ".lock"
CLAIMS_DIR = ".running"
LOCK_WAIT_S = 60.0  # the lock is held for milliseconds; a minute means its holder is stuck
CLAIM_MAX_BYTES = 64 * 1024  # a claim is a line of JSON; more is not one of ours
PID_MAX = 2 ** 31 - 1  # pid_t
CLAIM_GRACE_S = 60.0  # beyond the cell's time limit, before a claim of a live-looking holder is stale
HOST = socket.gethostname()


class RunDirBusy(ConfigError):
    """Another process held a results directory's lock longer than we would wait (one line, exit 2)."""


def read_rows(run_dir: Path) -> dict[str, CellRow]:
    """``run_dir``'s rows by key, in file order; none yet is an empty dict (a bad file is :class:`ResultsError`)."""
    path = Path(run_dir) / CELLS_FILE
    if not path.exists():
        return {}
    return {r.key: r for r in read_cells(path)}


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


def _not_ours(path: Path, what: str) -> ResultsError:
    return ResultsError(f"{path} is {what}, which this harness did not make and will not follow or write through; "
                        "remove it (no bench or sweep may be running on this run-id)")


def _open_lock(path: Path) -> int:
    """The lock file, opened without following a symlink; a link, a non-file or a hard-linked file refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_ours(path, "a symbolic link") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise _not_ours(path, "not a plain file" if not stat.S_ISREG(st.st_mode) else "a hard link to another file")
    return fd


@contextmanager
def run_dir_lock(run_dir: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the directory); :class:`RunDirBusy` after ``wait_s`` of waiting; a
    ``.lock`` that is a symlink (or not a plain file) is refused, never followed (:class:`ResultsError`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(run_dir / LOCK_FILE)
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


def merge_rows(run_dir: Path, new: list[CellRow], order: list[str]) -> dict[str, CellRow]:
    """Under the lock: re-read, replace rows by key, keep all others, replace atomically; returns all rows.

    The file lists ``order``'s keys first (the caller's matrix order), then the others in file order.
    """
    rows = read_rows(run_dir)
    rows.update({r.key: r for r in new})
    ranked = {k: i for i, k in enumerate(order)}
    keys = sorted(rows, key=lambda k: ranked.get(k, len(ranked)))  # stable: the others keep file order
    write_cells(Path(run_dir) / CELLS_FILE, [rows[k] for k in keys])  # each row validated as a CellRow
    return rows


def _claim_name(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:20] + ".json"


def _claims_dir(run_dir: Path, *, create: bool) -> int | None:
    """An fd of ``<run-dir>/.running`` opened without following a symlink (``None`` if absent and not
    ``create``); claims are then read, written and removed relative to it, so a link swapped in cannot
    redirect them.  A symlink or a file there is a :class:`ResultsError`."""
    path = Path(run_dir) / CLAIMS_DIR
    if create:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _not_ours(path, "a symbolic link" if path.is_symlink() else "not a folder") from None
        raise


def _bad_claim(path: Path, why: str) -> ResultsError:
    return ResultsError(f"claim file {path} is malformed ({why}); a claim is a JSON object with pid (an integer "
                        f"1..{PID_MAX}), host (a name) and deadline (a finite time): remove it if no bench or "
                        "sweep is running on this run-id")


def parse_claim(data: bytes, path: Path) -> dict[str, Any]:
    """A claim file's content checked: a JSON object with an int pid, a host name and a finite deadline."""
    try:
        info = json.loads(data)
    except ValueError:
        raise _bad_claim(path, "not JSON") from None
    if not isinstance(info, dict):
        raise _bad_claim(path, f"a JSON {type(info).__name__}, not an object")
    pid, host, deadline = info.get("pid"), info.get("host"), info.get("deadline")
    if type(pid) is not int or not 1 <= pid <= PID_MAX:
        raise _bad_claim(path, f"pid {pid!r}")
    if not isinstance(host, str) or not host:
        raise _bad_claim(path, f"host {host!r}")
    if type(deadline) not in (int, float) or not math.isfinite(deadline):
        raise _bad_claim(path, f"deadline {deadline!r}")
    return info


def _read_claim(dir_fd: int, name: str, path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_ours(path, "a symbolic link") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_ours(path, "not a plain file")
        return parse_claim(os.read(fd, CLAIM_MAX_BYTES), path)
    finally:
        os.close(fd)


def check_claims(run_dir: Path) -> None:
    """Under the lock, before a run's first cell: every claim in ``<run-dir>/.running`` well formed, and the
    folder the run's own (a :class:`ResultsError` naming the file otherwise, before anything is measured)."""
    dir_fd = _claims_dir(run_dir, create=False)
    if dir_fd is None:
        return
    try:
        for name in sorted(os.listdir(dir_fd)):
            if name.endswith(".json") and not name.startswith("."):
                _read_claim(dir_fd, name, Path(run_dir) / CLAIMS_DIR / name)
    finally:
        os.close(dir_fd)


def live_claim(run_dir: Path, key: str) -> dict[str, Any] | None:
    """Under the lock: the claim of another live process on ``key``, or ``None`` (no claim, or a stale one);
    a malformed claim is a :class:`ResultsError` naming its file."""
    dir_fd = _claims_dir(run_dir, create=False)
    if dir_fd is None:
        return None
    try:
        info = _read_claim(dir_fd, _claim_name(key), Path(run_dir) / CLAIMS_DIR / _claim_name(key))
    finally:
        os.close(dir_fd)
    if info is None:
        return None
    mine = info["pid"] == os.getpid() and info["host"] == HOST
    stale = not pid_alive(info["pid"], info["host"]) or time.time() > info["deadline"]
    return None if mine or stale else info


def claim_cell(run_dir: Path, key: str, timeout_s: float) -> dict[str, Any] | None:
    """Under the lock: claim ``key`` for this process; returns the other live holder's claim instead if any."""
    other = live_claim(run_dir, key)
    if other is not None:
        return other
    info = {"pid": os.getpid(), "host": HOST, "key": key, "deadline": time.time() + timeout_s + CLAIM_GRACE_S}
    dir_fd = _claims_dir(run_dir, create=True)
    assert dir_fd is not None  # just made
    try:
        write_atomic(Path(_claim_name(key)), json.dumps(info), dir_fd=dir_fd)  # O_EXCL temp + rename, in the folder
    finally:
        os.close(dir_fd)
    return None


def release_cell(run_dir: Path, key: str) -> None:
    """Under the lock: drop this process's claim on ``key`` (another's, or anything that is not a claim of
    ours, is left alone)."""
    try:
        dir_fd = _claims_dir(run_dir, create=False)
    except ResultsError:
        return
    if dir_fd is None:
        return
    try:
        name = _claim_name(key)
        info = _read_claim(dir_fd, name, Path(run_dir) / CLAIMS_DIR / name)
        if info is not None and info["pid"] == os.getpid() and info["host"] == HOST:
            os.unlink(name, dir_fd=dir_fd)
    except ResultsError:
        return
    finally:
        os.close(dir_fd)
