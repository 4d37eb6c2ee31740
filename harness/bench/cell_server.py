"""The server that forks cell processes (:mod:`harness.bench.forked`): ``python -m harness.bench.cell_server``.

It imports what every cell imports (torch, the child's modules) and ``torch._dynamo`` -- torch imports it
lazily at the first ``torch.optim`` step (``torch._compile._disable_dynamo`` on ``Optimizer.add_param_group``)
and at every non-reentrant ``torch.utils.checkpoint`` call (it reads ``torch._dynamo.config``), 3-4 s on a
small machine -- once, here; then it reads requests, one JSON line each on stdin, and for each forks a child
that runs :func:`harness.bench.child.main` as ``python -m harness.bench.child`` would, and answers on stdout
``{"pid": N}`` at once and ``{"pid": N, "rc": CODE}`` when the child ended (``-S``: killed by signal S).
It ends at EOF on stdin (the driver closed it or died) or with the driver (its death signal).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback
from typing import Any

import torch
import torch._dynamo  # noqa: F401 -- imported once here, not in every cell (see the module docstring)

from harness.bench import child
from harness.bench.process import PARENT_ENV

__all__ = ["serve", "run_forked_child", "main"]

EXIT_NOT_RUN = 70  # the forked child failed before the cell's own code ran


def _reply(message: dict[str, Any]) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


def _redirect(stderr_path: str) -> None:
    """stdin and stdout to /dev/null, stderr to the cell's file (the pipes to the driver are closed so)."""
    null = os.open(os.devnull, os.O_RDWR)
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((0, null), (1, null), (2, err)):
        os.dup2(target, fd)
    os.close(null)
    os.close(err)


def run_forked_child(request: dict[str, Any], server_pid: int) -> int:
    """In the forked child: become the cell's process (session, stdio, environment, directory, path), run it."""
    os.setsid()
    _redirect(request["stderr"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[PARENT_ENV] = str(server_pid)  # the death signal is armed to the server, which dies with the driver
    os.chdir(request["cwd"])
    entries = [request["cwd"], *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    sys.path[:0] = [p for p in entries if p not in sys.path]  # the user's code, as the fresh child finds it
    importlib.invalidate_caches()
    tempfile.tempdir = None  # TMPDIR of the request, not of the server's start
    sys.argv = [child.__file__, *request["argv"]]
    try:
        code = child.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 -- what an uncaught exception does to `python -m`: traceback, exit 1
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def serve(requests: Any) -> None:
    """Fork one child per request line, one at a time, and relay its pid and exit code."""
    server_pid = os.getpid()
    for line in requests:
        request = json.loads(line)
        if torch.cuda.is_initialized():  # never here; a child forked after it could not use CUDA
            _reply({"refused": "CUDA is initialised in the cell server"})
            continue
        pid = os.fork()
        if pid == 0:
            code = EXIT_NOT_RUN
            try:
                code = run_forked_child(request, server_pid)
            finally:
                os._exit(code)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"pid": pid, "rc": os.waitstatus_to_exitcode(status)})


def main() -> int:
    serve(sys.stdin.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
