"""Executors: where the cells of a matrix run -- one after another here, or spread over a Ray cluster.

* ``local`` (the default) -- :class:`harness.bench.process.LocalExecutor`: one fresh subprocess per cell, one
  cell at a time, on this machine (the ablation: one cell after another in this process).
* ``ray`` -- :class:`RayExecutor`: every cell a Ray task with ``max_calls=1`` (a fresh worker process per cell,
  so nothing leaks between cells) that asks for one GPU (``num_gpus=1``) for CUDA cells, or ``cpus_per_cell``
  CPUs otherwise.  Inside the task the cell runs exactly as ``local`` runs it (a fresh subprocess with the time
  limit, the same statuses; the subprocess dies with its worker, see ``harness.bench.process``); Ray's
  ``CUDA_VISIBLE_DEVICES`` reaches it, and its NVML lookup goes by the device's UUID (``harness.bench.nvml``).
  :meth:`RayExecutor.map` yields ``(item, result)`` as tasks finish; the driver alone writes results.  A worker
  that dies mid-cell (``kill -9``, the OOM killer) gives that cell the ``failed(item, reason)`` result, and
  the others go on.

``python -m harness bench --executor ray`` starts a local Ray instance and stops it at the end;
``--address auto`` (or ``HOST:PORT``, ``ray://HOST:PORT``) joins a running cluster.  Ray is the optional
``cluster`` extra: ``pip install 'maml-harness[cluster]'``.  See docs/scaling.md.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence, TypeVar

from harness.bench.process import LocalExecutor
from harness.core.config import ConfigError

__all__ = ["EXECUTORS", "CLUSTER_EXTRA", "ExecutorSpec", "RayExecutor", "open_executor", "add_executor_arguments",
           "check_cpus_per_cell", "executor_spec"]

EXECUTORS = ("local", "ray")
CLUSTER_EXTRA = "pip install 'maml-harness[cluster]' (or: pip install 'ray==2.60.*')"
REPO = Path(__file__).resolve().parents[2]
WAIT_S = 0.5  # how often the driver returns to Python while waiting for tasks (so Ctrl-C is seen)
CONNECT_TIMEOUT_S = 5.0  # reaching a cluster's address (ray.init against a dead one retries without end)

T = TypeVar("T")
R = TypeVar("R")


class ExecutorSpec(NamedTuple):
    """What ``--executor``, ``--address`` and ``--cpus-per-cell`` asked for."""

    kind: str = "local"
    address: str | None = None
    cpus_per_cell: float = 1.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs Ray, the optional 'cluster' extra: {CLUSTER_EXTRA}") from None
    return ray


def _check_reachable(address: str) -> None:
    """A one-line error unless ``HOST:PORT`` accepts a connection within :data:`CONNECT_TIMEOUT_S`."""
    if address == "auto":
        return  # ray.init finds the local cluster's address file, or fails at once
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"bad --address {address!r}; expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at --address {address} ({exc.strerror or exc}); "
                          "start one with `ray start --head` or leave --address out for a local instance") from None


def _run_job(fn: Callable[[T], R], item: T) -> R:
    """The body of every Ray task (a fresh worker each: ``max_calls=1``)."""
    return fn(item)


class RayExecutor:
    """Every job a Ray task in a fresh worker (``max_calls=1``), one GPU or ``cpus_per_cell`` CPUs each."""

    def __init__(self, address: str | None = None, cpus_per_cell: float = 1.0,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        check_cpus_per_cell(cpus_per_cell, address)
        self.ray = _import_ray()
        self.cpus_per_cell = cpus_per_cell
        self.started = False  # whether this executor started (and so stops) the Ray instance
        self._pending: dict[Any, Any] = {}  # task ref -> item, while a map runs
        if address is not None:
            _check_reachable(address)
        if self.ray.is_initialized():  # a driver that joined its cluster itself (a notebook, the tests)
            return
        path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        kwargs = dict(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                      runtime_env={"env_vars": {"PYTHONPATH": path}}, **(init_kwargs or {}))
        self._init(kwargs, address)
        self.started = True

    def _init(self, kwargs: dict[str, Any], address: str | None) -> None:
        """``ray.init`` in this thread (Ray ties its local instance's processes to the thread that starts
        them); an address is first checked to be reachable, so a dead one fails in seconds."""
        where = f"the Ray cluster at --address {address}" if address else "a local Ray instance"
        try:
            self.ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 -- whatever Ray raises, the user gets one line
            text = str(exc).strip().splitlines()
            raise ConfigError(f"could not start or join {where}: {type(exc).__name__}: "
                              f"{text[0] if text else ''}") from None

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, failed: Callable[[T, str], R],
            gpu: bool = False) -> Iterator[tuple[T, R]]:
        """``(item, fn(item))`` for every item, as the tasks finish (any order)."""
        ray = self.ray
        resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": self.cpus_per_cell}
        task = ray.remote(max_calls=1, max_retries=0, **resources)(_run_job)
        pending = self._pending = {task.remote(fn, item): item for item in items}
        try:
            while pending:
                # with a timeout: ray.wait blocks in C++, where Ctrl-C would not reach Python until a task ends
                done, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
                for ref in done:
                    item = pending.pop(ref)
                    yield item, self._result(ref, item, failed)
        finally:  # Ctrl-C, or the consumer stopped: nothing keeps running for us
            self._cancel_pending()

    def _cancel_pending(self) -> None:
        for ref in list(self._pending):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 -- already finished or its worker already gone
                pass
        self._pending = {}

    def _result(self, ref: Any, item: T, failed: Callable[[T, str], R]) -> R:
        ex = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except ex.WorkerCrashedError:
            return failed(item, "the Ray worker running the cell died (killed, or out of memory)")
        except ex.RayTaskError as exc:  # the job itself raised: keep its type and message
            cause = getattr(exc, "cause", None) or exc
            text = str(cause).strip().splitlines()
            return failed(item, f"Ray task raised {type(cause).__name__}: {text[-1] if text else ''}")
        except ex.RayError as exc:  # node lost, object lost, task cancelled by someone else ...
            text = str(exc).strip().splitlines()
            return failed(item, f"Ray: {type(exc).__name__}: {text[0] if text else ''}")

    def close(self) -> None:
        """Cancel what is still running (Ctrl-C lands here too) and stop the instance this executor started."""
        self._cancel_pending()
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_executor(spec: ExecutorSpec) -> Iterator[LocalExecutor | RayExecutor]:
    """The executor ``spec`` names, started (a one-line :class:`ConfigError` if it cannot be; nothing written)
    and stopped at the end of the block."""
    if spec.kind not in EXECUTORS:
        raise ConfigError(f"unknown --executor {spec.kind!r}; valid choices: {', '.join(EXECUTORS)}")
    if spec.kind == "local":
        if spec.address is not None:
            raise ConfigError("--address is for --executor ray")
        yield LocalExecutor()
        return
    with RayExecutor(spec.address, spec.cpus_per_cell) as executor:
        yield executor


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor``, ``--address``, ``--cpus-per-cell`` for bench, sweep and ablate (kept beside the executors
    until the commands share one argument module)."""
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: one cell after the other here (default); ray: every cell a Ray task")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to join (auto, HOST:PORT, ray://HOST:PORT); default: start a local instance")
    p.add_argument("--cpus-per-cell", type=float, default=1.0, metavar="N",
                   help="CPUs a CPU cell asks Ray for (default 1); a CUDA cell asks for one GPU")


def check_cpus_per_cell(cpus: float, address: str | None) -> float:
    """A finite number of CPUs > 0 that a cell can get: on a local instance at most this machine's CPUs (a cell
    asking for more would wait for ever); a cluster joined with ``--address`` is not known here."""
    limit = os.cpu_count() or 1
    if not (isinstance(cpus, (int, float)) and math.isfinite(cpus) and cpus > 0) or (address is None and cpus > limit):
        valid = f"a number in (0, {limit}] (this machine's CPUs)" if address is None else "a finite number > 0"
        raise ConfigError(f"--cpus-per-cell must be {valid}, got {cpus!r}")
    return float(cpus)


def executor_spec(args: argparse.Namespace) -> ExecutorSpec:
    """``--executor``, ``--address`` and ``--cpus-per-cell``, checked before a folder is made or Ray starts."""
    return ExecutorSpec(args.executor, args.address, check_cpus_per_cell(args.cpus_per_cell, args.address))
