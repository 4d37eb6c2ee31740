"""``python -m harness ablate --preset sinusoid``: plan the cells, train the missing ones, report.

Base (non-checkpointed) variants are trained on every seed; each checkpointed variant only on the first
``verify_seeds`` seeds, where it is checked bit for bit against its non-checkpointed counterpart (added
when not requested), because checkpointing recomputes the same numbers and adds no statistical
information.  Every cell is an :class:`~harness.reporting.schema.AblationCell`, written atomically to
``<out>/<run-id>/cells/<variant>_s<seed>.json`` and reused on a rerun, so an interrupted ablation resumes
where it stopped; the summary is an :class:`~harness.reporting.schema.AblationSummary` (``summary.json``).

Stopping it (SIGINT, SIGTERM, SIGHUP: exit 130, 143, 129) keeps every finished cell (written) and, with
``--jobs N``, cancels the cells not started and terminates the worker processes at once; a worker also dies
with its parent when that is SIGKILLed (its parent-death signal, ``harness.bench.process.die_with_parent``)
and ignores a terminal's Ctrl-C, which its parent handles.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from harness.bench.process import STOP_GRACE_S, die_with_parent, signals_as_interrupts
from harness.core.config import ConfigError
from harness.reporting.files import read_row, write_json
from harness.reporting.provenance import environment
from harness.reporting.schema import AblationCell, AblationSummary, ResultsError
from harness.studies.ablation.run import run_cell
from harness.studies.ablation.spec import AblationSpec, plan
from harness.studies.ablation.summary import summarise
from harness.studies.ablation.tables import write_report
from harness.loop.spec import default_threads
from harness.variants import Variant
from harness.zoo.presets import get_preset
from harness.zoo.user import build_model

__all__ = ["cell_path", "load_cell", "run_ablation"]

def cell_path(out: Path, variant: str, seed: int) -> Path:
    return out / "cells" / f"{variant.replace('/', '~')}_s{seed}.json"


def load_cell(path: Path, spec: AblationSpec) -> AblationCell | None:
    """A stored cell of this configuration, None when absent or unreadable; another configuration is an error."""
    if not path.exists():
        return None
    try:
        cell = read_row(path, AblationCell)
    except (OSError, ResultsError):
        # unreadable, truncated, malformed or of another schema version: recompute.  Cells of "schema": 2
        # (before every row type shared SCHEMA_VERSION 1) land here too and are simply recomputed.
        return None
    if cell.spec != spec.fingerprint():
        raise ConfigError(f"{path} was made with another configuration ({cell.spec}); "
                          "pass --force to recompute or choose another --run-id")
    return cell


def _worker_setup(threads: int | None) -> None:
    """Each worker process: the same thread count and deterministic algorithms as a sequential run."""
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _worker_init(parent_pid: int, threads: int | None) -> None:
    """A worker process: dies with its parent (even SIGKILLed), leaves Ctrl-C to it, then :func:`_worker_setup`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid, lambda: None)
    _worker_setup(threads)


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = STOP_GRACE_S) -> None:
    """Cancel the cells not started and end the running ones now (SIGTERM, then SIGKILL after ``grace_s``)."""
    workers = list((pool._processes or {}).values())  # noqa: SLF001 -- the executor has no public handle on them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in workers:
        proc.terminate()
    for proc in workers:
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _cells_in_workers(spec: AblationSpec, todo: list[tuple[Variant, int]], threads: int | None, bar: tqdm,
                      keep: Callable[[AblationCell], None]) -> None:
    """Cells trained ``spec.jobs`` at a time in spawned processes (independent, single-threaded, deterministic),
    each kept as it finishes; on a stop the workers end at once and every cell finished by then is kept."""
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=spec.jobs, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), threads))
    futures = [pool.submit(run_cell, spec, v, seed) for v, seed in todo]
    kept: set[Future] = set()
    try:
        for fut in as_completed(futures):
            cell = fut.result()
            bar.set_description(f"{cell.variant['name']} s{cell.seed}")
            bar.update(spec.meta_steps)
            keep(cell)
            kept.add(fut)
    except BaseException:  # Ctrl-C, SIGTERM/SIGHUP (Interrupted), a broken pool: stop now, keep what finished
        _stop_workers(pool)
        for fut in futures:
            if fut not in kept and fut.done() and not fut.cancelled() and fut.exception() is None:
                keep(fut.result())
        raise
    pool.shutdown()


def _train_in_worker(spec: AblationSpec, threads: int | None, job: tuple[Variant, int]) -> AblationCell:
    """One (variant, seed) in a Ray worker of its own, with the same thread count and determinism as here."""
    _worker_setup(threads)
    return run_cell(spec, job[0], job[1])


def _lost_cell(spec: AblationSpec, job: tuple[Variant, int], reason: str) -> AblationCell:
    """The ``error`` cell of a (variant, seed) whose executor lost it (its Ray worker died): nothing measured."""
    v, seed = job
    return AblationCell(status="error", message=reason, variant={"name": v.name, **v.flags}, seed=seed,
                        spec=spec.fingerprint())


def _cells_on(executor: Any, spec: AblationSpec, todo: list[tuple[Variant, int]], threads: int | None, bar: tqdm,
              keep: Callable[[AblationCell], None]) -> None:
    """Cells trained as tasks of a batch executor (``--executor ray``: a fresh Ray worker per cell)."""
    for (v, seed), cell in executor.map(partial(_train_in_worker, spec, threads), todo,
                                        failed=partial(_lost_cell, spec), gpu=spec.device == "cuda"):
        bar.set_description(f"{v.name} s{seed}")
        bar.update(spec.meta_steps)
        keep(cell)


def _train_missing(spec: AblationSpec, out: Path, todo: list[tuple[Variant, int]], cells: dict,
                   progress: bool | None, threads: int | None, executor: Any = None) -> None:
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    _worker_setup(threads)
    bar = tqdm(total=len(todo) * spec.meta_steps, unit="step", file=sys.stderr,
               disable=None if progress is None else not progress, dynamic_ncols=True)

    def keep(cell: AblationCell) -> None:
        write_json(cell_path(out, cell.variant["name"], cell.seed), cell)
        cells[(cell.variant["name"], cell.seed)] = cell.to_dict()  # the summary reads cells as dicts

    def sequential() -> None:
        for v, seed in todo:
            bar.set_description(f"{v.name} s{seed}")
            cell = run_cell(spec, v, seed, on_step=lambda: bar.update(1))
            bar.update(spec.meta_steps - len(cell.train_loss))
            keep(cell)

    try:
        if hasattr(executor, "map"):  # --executor ray
            _cells_on(executor, spec, todo, threads, bar, keep)
        elif spec.jobs > 1 and len(todo) > 1:
            _cells_in_workers(spec, todo, threads, bar, keep)
        else:
            sequential()
    finally:
        bar.close()
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


def _model_for_threads(spec: AblationSpec) -> torch.nn.Module:
    """The model whose size picks the default thread count: the user's (``--model``, with its keywords) or the
    preset's default one."""
    preset = get_preset(spec.preset)
    return build_model(spec.model, spec.model_overrides) if spec.model else preset.model()


def run_ablation(spec: AblationSpec, results_root: Path = Path("results"), plots_root: Path = Path("plots"),
                 force: bool = False, progress: bool | None = None, log: Callable[[str], None] = print,
                 command: str = "", executor: Any = None) -> dict[str, Any]:
    """Train what is missing, then write ablation.csv, effects.csv, checks.csv, table.md, summary.json, plots.

    Returns the :class:`AblationSummary` as a dict, with the ``curves`` and the ``paths`` written.
    """
    out, plots = Path(results_root) / spec.run_id, Path(plots_root) / spec.run_id
    cells_plan = plan(spec)
    todo, cells = [], {}
    for v, _ in sorted(cells_plan, key=lambda c: not c[0].checkpointed):  # longest cells first: better packing
        for seed in spec.seeds_for(v.checkpointed):
            cell = None if force else load_cell(cell_path(out, v.name, seed), spec)
            if cell is None:
                todo.append((v, seed))
            else:
                cells[(v.name, seed)] = cell.to_dict()
    n_ckpt = sum(v.checkpointed for v, _ in cells_plan)
    log(f"ablate {spec.preset}: {len(cells_plan) - n_ckpt} base variants x {spec.seeds} seeds + {n_ckpt} "
        f"checkpointed x {spec.verify_seeds} seeds, {spec.meta_steps} meta-steps; "
        f"{len(cells)} cells reused, {len(todo)} to train in {min(spec.jobs, max(1, len(todo)))} process(es)")
    threads = spec.threads if spec.threads is not None else default_threads(spec.device, _model_for_threads(spec))
    start = time.perf_counter()
    if todo:
        with signals_as_interrupts():  # SIGTERM/SIGHUP stop it as Ctrl-C does: finished cells kept, workers ended
            _train_missing(spec, out, todo, cells, progress, threads, executor)
    train_s = time.perf_counter() - start
    summary = AblationSummary(
        **summarise(spec, cells_plan, cells), run_id=spec.run_id, command=command,
        config={**asdict(spec), "variants": list(spec.variants),
                "task_overrides": spec.fingerprint()["task_overrides"], "threads": threads},
        trained_cells=len(todo), reused_cells=len(cells) - len(todo), train_wall_s=train_s,
        cells_wall_s=sum(c["wall_s"] for c in cells.values()),
        cells_cpu_s=sum(c.get("cpu_s", 0.0) for c in cells.values()), env=environment(spec.device))
    write_report(summary, out, plots)
    return {**summary.to_dict(), "paths": {"dir": str(out), "plots": str(plots)}}
