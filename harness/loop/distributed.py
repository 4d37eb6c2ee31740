"""Data-parallel meta-training: the meta-batch's tasks sharded over torch.distributed ranks.

Launch any training command with torch's elastic launcher; nothing else changes::

    torchrun --standalone --nproc-per-node 2 -m harness run --variant ckpt_lr --meta-batch 5
    python -m harness bench --set ranks=2          # a bench cell launched the same way

Why it is exact: every rank draws the *same full* meta-batch from the same task generator
(cheap for synthetic tasks; a real data set pays N times the sampling) and keeps tasks
``i`` with ``i % world == rank``, so the union of the shares is exactly the meta-batch one
process would draw.  Each rank's learner returns the mean meta-gradient over its ``n_r``
tasks; it is multiplied by ``n_r``, summed over ranks (flat buckets, one ``all_reduce``
per bucket) and divided by the *total* task count: tasks are weighted, not ranks, so a
meta-batch of 5 on 2 ranks gives the one-process gradient.  The logged loss is reduced
the same way.  No ``DistributedDataParallel``: the engine takes one outer gradient per
task with ``torch.autograd.grad``, which never runs DDP's gradient hooks (see
docs/scaling.md).

fp16: the GradScaler's non-finite count travels in the same bucket, so every rank skips the
same steps and keeps the same scale.  A rank that raises inside a meta-step joins the next
reduction with an error flag instead of dying, so every rank raises :class:`RankFailed`
naming it at once (no hang); a rank that dies outright is caught by torchrun's agent or,
at the latest, by the collective timeout (``HARNESS_DIST_TIMEOUT_S``, default 300 s).  Ranks started
with different settings (another ``--seed`` on one) compare a hash of their resolved configuration
before the first collective and all exit with one line naming the differing setting (exit 2).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from harness.core.config import ConfigError
from harness.settings import DIST_TIMEOUT_ENV, check_ranks, env_number

__all__ = ["DataParallel", "RankFailed", "launched", "session", "current", "check_same_config",
           "config_digest", "launcher",
           "single_process_summary", "BUCKET_BYTES", "TIMEOUT_ENV", "FAULT_ENV"]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_ENV = DIST_TIMEOUT_ENV  # a positive finite number of seconds (checked: harness.settings.env_number)
DEFAULT_TIMEOUT_S = 300.0
FAULT_ENV = "MAML_HARNESS_FAIL_RANK"  # test hook: "RANK:STEP" raises RuntimeError in that rank's meta-step
BUCKET_BYTES = 25 * 1024 * 1024  # as DDP's default bucket_cap_mb
_CURRENT: "DataParallel | None" = None


class RankFailed(RuntimeError):
    """Another rank (or this one) raised during a meta-step; the message names the rank and its error."""


def launched() -> bool:
    """Started by torchrun (``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are set)?"""
    return all(v in os.environ for v in ENV_VARS)


def launcher(ranks: int) -> list[str]:
    """The command prefix that starts ``ranks`` processes of ``-m module ...`` (this interpreter for 1)."""
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]


def current() -> "DataParallel | None":
    """The group :func:`session` set up in this process, or None (one process)."""
    return _CURRENT


@dataclass
class DataParallel:
    """This process's place in the group, and the collectives the training loop needs."""

    rank: int
    world: int
    backend: str
    steps: int = 0  # meta-steps in this process, 0-based, incl. run's side measurement (the fault hook, messages)
    reduce_s: list[float] = field(default_factory=list)  # per meta-step: all-reduce incl. waiting for other ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, tasks: Sequence[Any]) -> list[Any]:
        """Tasks ``i`` with ``i % world == rank``: the shares partition the meta-batch."""
        if len(tasks) < self.world:
            raise ConfigError(f"meta-batch {len(tasks)} is smaller than the {self.world} ranks; "
                              f"valid: at most {len(tasks)} ranks (or a larger --meta-batch)")
        return list(tasks)[self.rank::self.world]

    def broadcast_module(self, module: nn.Module, *, buffers_only: bool = False) -> None:
        """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank, in flat buckets."""
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers() if b.is_floating_point() or b.dtype == torch.long]
        for bucket in _buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.broadcast(flat, src=0)
            _unflatten_into(flat, bucket)

    def step(self, learner: Any, tasks: Sequence[Any], loss_scale: float = 1.0) -> tuple[float, bool]:
        """This rank's share of one meta-step; leaves the task-weighted mean meta-gradient in ``.grad``
        on every rank.  Returns (task-weighted mean loss, any rank's gradient non-finite)."""
        local, step = self.shard(tasks), self.steps
        self.steps += 1
        params = [p for p in learner.parameters() if p.requires_grad]
        error: str | None = None
        loss = 0.0
        try:
            _inject_fault(self.rank, step)
            loss = float(learner.step(local) if loss_scale == 1.0 else learner.step(local, loss_scale=loss_scale))
        except Exception as exc:  # noqa: BLE001 -- reported to every rank below, then raised everywhere
            error = f"rank {self.rank} failed at meta-step {step}: {type(exc).__name__}: {exc}".splitlines()[0]
            for p in params:
                p.grad = None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in grads)
        weight = len(local) / len(tasks)
        status = torch.tensor([loss * weight, float(nonfinite), float(error is not None)], dtype=torch.float64)
        loss_sum, nonfinite_sum, errors = self._reduce(grads, weight, status)
        if errors:
            raise RankFailed(self._first_error(error))
        for p, g in zip(params, grads):
            p.grad = g
        if isinstance(learner, nn.Module) and any(True for _ in learner.buffers()):
            self.broadcast_module(learner, buffers_only=True)  # BatchNorm statistics: rank 0's, as DDP does
        if nonfinite_sum and all(bool(torch.isfinite(g).all()) for g in grads):
            for g in grads:  # cannot happen after a sum, but every rank must skip if any rank overflowed
                g.fill_(float("nan"))
        return loss_sum, bool(nonfinite_sum)

    def _reduce(self, grads: list[torch.Tensor], weight: float, status: torch.Tensor) -> tuple[float, float, float]:
        """``sum_r weight_r * grad_r`` into ``grads`` in place (flat buckets), and the status summed."""
        t0 = time.perf_counter()
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket]).mul_(weight)
            dist.all_reduce(flat)
            _unflatten_into(flat, bucket)
        status = status.to(grads[0].device) if grads else status
        dist.all_reduce(status)
        loss, nonfinite, errors = status.tolist()
        self.reduce_s.append(time.perf_counter() - t0)
        return loss, nonfinite, errors

    def _first_error(self, mine: str | None) -> str:
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, mine)
        return next(m for m in messages if m)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def summary(self, memory: dict[str, Any], key: str = "cpu_peak_alloc_mib") -> dict[str, Any]:
        """The result row's ``distributed`` entry: world size, backend, every rank's memory peak, the max."""
        per_rank = self.gather(memory.get(key))
        reduce_ms = self.gather(statistics.median(self.reduce_s) * 1e3 if self.reduce_s else None)
        known = [m for m in per_rank if m is not None]
        return {"world_size": self.world, "backend": self.backend, "memory_key": key,
                "rank_memory_mib": per_rank, "max_rank_memory_mib": max(known) if known else None,
                "rank_reduce_median_ms": reduce_ms}


def single_process_summary(memory: dict[str, Any], key: str = "cpu_peak_alloc_mib") -> dict[str, Any]:
    """The same ``distributed`` entry for a one-process run."""
    return {"world_size": 1, "backend": None, "memory_key": key, "rank_memory_mib": [memory.get(key)],
            "max_rank_memory_mib": memory.get(key)}



def config_digest(config: dict[str, Any]) -> str:
    """A rank's resolved configuration as one hash (canonical JSON: key order and tuples do not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(group: DataParallel, config: dict[str, Any]) -> None:
    """Every rank's ``config`` hashed and the hashes gathered, the first collective of a run; when they differ
    the configurations are gathered too and every rank raises the same ConfigError naming the settings that
    differ and each rank's value (``seed (rank 0: 0, rank 1: 1)``), instead of a collective failing later
    with an error that does not say why."""
    digests = group.gather(config_digest(config))
    if len(set(digests)) == 1:
        return
    configs = group.gather(json.loads(json.dumps(config, default=str)))
    keys = sorted({k for c in configs for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    named = "; ".join(f"{k} (" + ", ".join(f"rank {r}: {c.get(k, '(unset)')}" for r, c in enumerate(configs)) + ")"
                      for k in differ)
    raise ConfigError(f"the {group.world} ranks were started with different settings: {named}; "
                      "start every rank with the same command line")


@contextmanager
def session(device: str, meta_batch: int | None = None,
            config: dict[str, Any] | None = None) -> Iterator[DataParallel | None]:
    """Under torchrun: init the process group (gloo on CPU, NCCL on CUDA, with the collective timeout),
    make it :func:`current` and tear it down after; otherwise yield None and do nothing.

    ``meta_batch``: check that every rank gets a task first (a ConfigError on every rank, before any
    collective, so no rank waits for one that has already left).  ``config``: the rank's resolved
    configuration (settings, variant, seed, ...), compared across ranks before anything else
    (:func:`check_same_config`; a ConfigError naming the differing settings on every rank).
    """
    global _CURRENT
    if not launched():
        yield None
        return
    if meta_batch is not None:
        check_ranks(os.environ["WORLD_SIZE"], meta_batch)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = env_number(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    _CURRENT = DataParallel(dist.get_rank(), dist.get_world_size(), backend)
    try:
        if config is not None:
            check_same_config(_CURRENT, config)
        yield _CURRENT
    finally:
        _CURRENT = None
        dist.destroy_process_group()


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of one dtype and device of at most BUCKET_BYTES (a larger tensor alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec}) at unix time {time.time():.3f}")
