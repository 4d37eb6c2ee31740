"""Cell processes forked from a server that has already imported torch and the harness (Linux).

A fresh ``python -m harness.bench.child`` spends 5-10 s importing torch and the harness before it measures; a
matrix of N cells pays that N times.  :class:`CellServer` starts one server process per driver,
``python -m harness.bench.cell_server`` (which imports torch, the child's modules and ``torch._dynamo``, then
waits), and asks it for each cell: the server ``fork``s a child that is the cell's process exactly as
``harness.bench.process`` promises -- its own session (a stop of its group ends all it starts), the driver's
environment, working directory and ``PYTHONPATH`` of the moment, its stderr in the cell's file, the death
signal armed (to the server, which itself dies with the driver: :func:`harness.bench.deathsig.guarded`), and
its exit status (a signal as ``-N``) relayed to the driver.  One cell at a time per server; the server never
runs a cell itself, so it never initialises CUDA (and refuses to fork if it ever has: the driver then starts the
cell fresh), and each cell gets its own CUDA context.

When the server is not used, the cell starts fresh as before (``harness.bench.process``): not Linux,
``HARNESS_CELL_START=fresh``, a multi-rank cell (torchrun starts it), a Ray worker (already a fresh process per
cell), or a server that could not start or answer.  The driver's environment at the server's start is what the
server imported torch with; when it changes (``TMPDIR`` of the next command, a variable torch reads at import),
the server is replaced before the next cell.

Try it: ``HARNESS_CELL_START=fresh python -m harness bench --variants maml,fo --run-id a`` against the same
without the variable; compare the wall times.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.bench.deathsig import LINUX, STOP_SIGNALS, guarded

__all__ = ["SERVER_MODULE", "CellServer", "ForkedCell", "ServerUnavailable", "CELL_SERVER"]

SERVER_MODULE = "harness.bench.cell_server"  # python -m harness.bench.cell_server: requests on stdin
REPO = Path(__file__).resolve().parents[2]


class ServerUnavailable(RuntimeError):
    """The server could not start, refused the cell, or ended before it forked it: start the cell fresh."""


class CellServer:
    """The driver's side: the server process, started on first use, replaced when it died or the environment
    changed; :meth:`launch` forks one cell process.  Thread-safe (a lock), one cell at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._env: dict[str, str] | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def _start(self) -> None:
        env = dict(os.environ)
        path = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # deathsig's launcher unblocks them
        try:
            self._proc = subprocess.Popen(guarded([sys.executable, "-m", SERVER_MODULE]), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO),
                                          env={**env, "PYTHONPATH": path}, start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._env, self._buf = env, b""

    def close(self) -> None:
        """End the server (its stdin closed, then SIGKILL); a cell it forked dies with it (its death signal)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def launch(self, argv: list[str], env: dict[str, str], cwd: str, stderr_path: Path,
               deadline: float) -> "ForkedCell":
        """Fork ``python -m harness.bench.child ARGV`` as the server's child; :class:`ServerUnavailable` when it
        cannot (the caller starts the cell fresh); ``TimeoutError`` when ``deadline`` passed before it forked."""
        with self._lock:
            for attempt in (1, 2):  # a server that died since its last cell is replaced once
                if self._proc is not None and (self._proc.poll() is not None or dict(os.environ) != self._env):
                    self.close()
                if self._proc is None:
                    self._start()
                try:
                    self._send({"argv": argv, "env": env, "cwd": cwd, "stderr": str(stderr_path)})
                    reply = self._read(deadline)
                except ServerUnavailable:
                    self.close()
                    if attempt == 2:
                        raise
                    continue
                except BaseException:  # a stop (Ctrl-C, SIGTERM) or the deadline while the server imports
                    self.close()
                    raise
                if "pid" not in reply:
                    raise ServerUnavailable(str(reply.get("refused", reply)))
                return ForkedCell(self, int(reply["pid"]))
        raise AssertionError("unreachable")

    def _send(self, request: dict[str, Any]) -> None:
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ServerUnavailable(f"the cell server is gone ({exc})") from None

    def _read(self, deadline: float | None) -> dict[str, Any]:
        """The server's next reply line; ``TimeoutError`` at ``deadline`` (``time.monotonic``), None: no limit."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ServerUnavailable("the cell server ended")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


class ForkedCell:
    """A cell process the server forked: awaited and stopped like a ``subprocess.Popen`` of its own group."""

    def __init__(self, server: CellServer, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (``-N``: killed by signal N); ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
        The server ending meanwhile reads as the cell killed by SIGKILL (the server is gone with its cells)."""
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            reply = self.server._read(deadline)
        except TimeoutError:
            raise subprocess.TimeoutExpired(SERVER_MODULE, timeout) from None
        except ServerUnavailable:
            self.server.close()
            reply = {"pid": self.pid, "rc": -signal.SIGKILL}
        self.returncode = int(reply["rc"])
        return self.returncode

    def signal_group(self, signum: int) -> None:
        kills = (os.killpg, os.kill) if self.returncode is None else (os.killpg,)  # the child too: before setsid
        for kill in kills:
            try:
                kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float) -> None:
        """SIGTERM to its group, SIGKILL after ``grace_s`` at most, and reaped (its status read)."""
        self.signal_group(signal.SIGTERM)
        try:
            self.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.signal_group(signal.SIGKILL)  # whatever of the group is left, as process.stop_group does
        self.wait()


CELL_SERVER = CellServer() if LINUX else None  # the driver's one server (started on first use)
