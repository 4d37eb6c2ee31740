"""One temp folder per run, removed when the run ends: nothing of a run is left in the system's temp folder.

``python -m harness <command>`` runs inside :func:`run_temp_folder`: ``harness-run-<pid>-XXXX`` in the temp
folder, with ``TMPDIR`` pointed at it for this process and every child, and so Python's ``tempfile``: every
child's temp files (the cells' ``harness-cell-*``, scaling's ``harness-scaling-*``), torchrun's
``torchelastic_*`` folder and torch's compile cache (``torchinductor_<user>``, unless ``TORCHINDUCTOR_CACHE_DIR``
names a folder of the user's) land inside it.
Ray keeps its session folder where it was (``RAY_TMPDIR``: its sockets need a short path).

What removes it:

* the run ends, normally, with an error, or on SIGINT/SIGTERM/SIGHUP (the commands that start children turn
  those into an exception, ``harness.bench.process.signals_as_interrupts``) -- the ``finally`` of the block;
* the driver is SIGKILLed -- its reaper, a small stdlib-only process in a session of its own started with the
  folder (:data:`REAPER`), waits on a pipe from the driver; at its end (EOF: the driver exited or died) it removes
  the folder, again and again for 3 s while the dying children may still write, then exits.  (Ray, for one,
  SIGKILLs its workers' cell processes when the driver dies, so they cannot clean up themselves.)
* the reaper was killed too -- the next run's :func:`sweep_stale` removes every ``harness-run-<pid>-*``
  folder of ours whose pid is dead.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["REAPER", "RUN_TEMP_PREFIX", "owner_pid", "pid_alive", "run_temp_folder", "sweep_stale"]

RUN_TEMP_PREFIX = "harness-run-"
_NAME = re.compile(rf"{re.escape(RUN_TEMP_PREFIX)}(\d+)-[^/]+")
_POINTED = ("TMPDIR", "RAY_TMPDIR")
# python -I -S -c REAPER FOLDER, stdin the read end of a pipe only the driver writes to
REAPER = """
import os, shutil, sys, time
sys.stdin.buffer.read()  # EOF: the driver has exited or died
if os.path.lexists(sys.argv[1]):  # it died: its children may still write as they die (torch recreates its cache)
    for _ in range(8):
        shutil.rmtree(sys.argv[1], ignore_errors=True)
        time.sleep(0.4)
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""

def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (not Linux): os.kill found it
        return True


def owner_pid(path: Path) -> int | None:
    """The pid in a ``harness-run-<pid>-XXXX`` name; None for any other name."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _ours(path: Path) -> bool:
    """A real folder (not a link) of this user: the only kind a sweep removes."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def sweep_stale(base: Path) -> list[Path]:
    """Remove the ``harness-run-<pid>-*`` folders of ours in ``base`` whose pid is dead; the ones removed."""
    removed = []
    for path in Path(base).glob(f"{RUN_TEMP_PREFIX}*"):
        pid = owner_pid(path)
        if pid is not None and _ours(path) and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _start_reaper(path: Path) -> tuple[subprocess.Popen, int]:
    """The reaper of ``path`` (:data:`REAPER`) and the write end of its pipe (not inherited by the children that
    ``subprocess`` starts, so only this process holds it)."""
    read_end, write_end = os.pipe()
    try:
        reaper = subprocess.Popen([sys.executable, "-I", "-S", "-c", REAPER, str(path)], stdin=read_end,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read_end)
    return reaper, write_end


@contextmanager
def run_temp_folder() -> Iterator[Path]:
    """This run's temp folder, for this process and its children, removed at the end (stale ones swept first).
    A process started inside another run's folder (``scaling``'s ``harness run``, its torchrun ranks) uses that
    one: its owner removes it."""
    base = Path(tempfile.gettempdir())
    if owner_pid(base) is not None:
        yield base
        return
    sweep_stale(base)
    path = Path(tempfile.mkdtemp(prefix=f"{RUN_TEMP_PREFIX}{os.getpid()}-", dir=base))
    saved_env, saved_tempdir = {k: os.environ.get(k) for k in _POINTED}, tempfile.tempdir
    ray_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # where Ray put it before us
    os.environ.update({"TMPDIR": str(path), "RAY_TMPDIR": ray_tmp})
    tempfile.tempdir = str(path)
    reaper, pipe = _start_reaper(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(path, ignore_errors=True)
        os.close(pipe)  # the reaper finds the folder gone and exits
        reaper.wait()
