"""What runs inside a cell's own process: build the cell's learner, measure it, write its row.

The driver (``harness.bench.process``) starts ``python -m harness.bench.child CELL.json OPTS.json ROW.json``
in a temp folder; the child arms its death with the driver first (:func:`process.die_with_parent`), then
measures.  A cell fault never raises out of :func:`measure_cell_inline`: its status says what happened
(``harness.bench.cells`` lists them; a ``ConfigError`` of the variant is ``unsupported``, one of the user's
factory or sampler ``error``).  With ``MeasureOptions.fd_directions`` (``python -m harness check``) a
second-order cell also gets ``fd_rel_err``, finite differences against its meta-gradient
(:mod:`harness.gradcheck`).  :func:`peer_precheck` is the one piece the driver calls itself, to
record a peer cell that cannot run without starting a process.

Debug one cell in this process: ``python -c "from harness.bench.child import measure_cell_inline;
from harness.bench.cells import Cell, MeasureOptions; print(measure_cell_inline(Cell('maml', 'quick'),
MeasureOptions()))"``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from harness.loop import distributed
from harness.bench import measure, paired
from harness.bench.cells import (BUILDERS, PLUGIN_ENV, Builder, Cell, MeasureOptions, base_row,
                                 load_cell_plugins)
from harness.bench.planner import MemoryPlan, plan_experiment
from harness.bench.process import PARENT_ENV, TEMP_PREFIX, cell_environment, die_with_parent
from harness.core.config import ConfigError
from harness.gradcheck import finite_difference_error
from harness.loop.agreement import check_meta_gradients
from harness.loop.spec import Experiment
from harness.loop.train import Diverged, StepRunner
from harness.reporting.files import write_json
from harness.reporting.schema import CellRow
from harness import peers
from harness.variants import get_variant
from harness.zoo.user import UserCodeError

__all__ = ["measure_cell_inline", "peer_precheck", "failure_status", "main", "ALLOC_FAILURES", "RowSoFar"]

# what a failed allocation says when it is not a MemoryError: PyTorch's CPU allocator, C++'s operator new
ALLOC_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "std::bad_alloc")
PAIRED_SHARE = 0.8  # the paired pass ends within this share of the cell's time limit, counted from its start


class _Unsupported(Exception):
    """The cell names a peer that has no builder or cannot express the variant."""


def _builder(peer: str) -> Builder:
    load_cell_plugins()
    if peer in BUILDERS:
        return BUILDERS[peer]
    return peers.build_peer


def peer_precheck(cell: Cell) -> str | None:
    """Why a ``higher:``/``torchopt:`` cell cannot run (peer not installed, or it cannot express the variant
    at the cell's precision), decided in the driver without a subprocess; ``None`` when it may run.

    Not installed wins (the reason names ``pip install '.[peers]'``).  Cells of other prefixes, an unknown
    variant, or any cell when plugins are named in ``HARNESS_CELL_PLUGINS`` (a plugin may replace a peer's
    builder), return ``None``: the cell's own process decides and records it.
    """
    if cell.peer is None or os.environ.get(PLUGIN_ENV) or cell.peer in BUILDERS:
        return None
    try:
        variant = get_variant(cell.base_variant)
    except ConfigError:
        return None
    if cell.peer not in peers.PEERS:
        return None
    present, why = peers.available(cell.peer)
    if not present:
        return why
    ok, reason = peers.supports(cell.peer, variant, str(cell.settings.get("amp", "off")))
    return None if ok else f"{peers.cell_name(cell.peer, cell.base_variant)} is unsupported: {reason}"


def failure_status(exc: BaseException) -> tuple[str, str]:
    """(status, message) of an exception that ended a cell: ``oom`` for any out-of-memory, else ``error``."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return "oom", f"CUDA out of memory: {first}"
    if isinstance(exc, MemoryError):
        return "oom", f"MemoryError: {exc}"
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in ALLOC_FAILURES):
        return "oom", f"failed allocation: {first}"
    return "error", f"{type(exc).__name__}: {exc}"


class RowSoFar:
    """A cell's row as its measurement fills it in, step by step: each :meth:`set` is a ``dataclasses.replace``
    of the :class:`CellRow` (a name it has no field for raises), and a fault keeps what was filled before it."""

    def __init__(self, row: CellRow) -> None:
        self.row = row

    def set(self, **fields: Any) -> None:
        self.row = replace(self.row, **fields)


def _learner(cell: Cell, row: RowSoFar, warmup: bool = True) -> tuple[Experiment, Any]:
    spec = cell.run_spec()
    variant = spec.variant_obj
    row.set(flags=variant.flags)  # before the build: a cell that fails to build keeps its flags
    if variant.memory_budget and cell.peer is not None:
        raise _Unsupported(f"{cell.variant}: --memory-budget plans the harness's own engine; a peer runs as it is")
    given = MemoryPlan.from_json(cell.memory_plan) if cell.memory_plan else None  # the driver's, as it printed it
    exp, plan = plan_experiment(Experiment(spec), warmup=warmup, given=given)
    variant = exp.variant
    if plan is not None:
        row.set(flags=variant.flags, **plan.fields())
    row.set(sizes=exp.sizes)
    if cell.peer is None:
        return exp, exp.learner
    try:
        return exp, _builder(cell.peer)(cell.peer, variant, exp)
    except ModuleNotFoundError as exc:
        raise _Unsupported(f"no learner builder for peer {cell.peer!r}: {exc}") from exc
    except ConfigError as exc:
        raise _Unsupported(str(exc)) from exc


def _measure(cell: Cell, opts: MeasureOptions, row: RowSoFar, started: float) -> None:
    exp, learner = _learner(cell, row, warmup=opts.warmup > 0)
    tasks = exp.sample()
    agree, fidelity = check_meta_gradients(exp, tasks, learner)
    row.set(agreement=agree, fidelity=fidelity)
    if opts.fd_directions and cell.peer is None and exp.learner.cfg.estimator == "exact":  # python -m harness check
        row.set(fd_rel_err=finite_difference_error(learner, tasks, directions=opts.fd_directions))
    step = StepRunner(learner, exp.sizes["outer_lr"], exp.sample, scaler=exp.new_scaler())
    cap = int(opts.cpu_mem_cap_mib * measure.MIB) if opts.cpu_mem_cap_mib is not None else None
    m = measure.measure(step, cell.device, warmup=opts.warmup, repeats=opts.repeats, nvml=opts.nvml, cap_bytes=cap)
    timing = m.pop("time")
    row.set(time=timing, memory=m, losses=step.losses, final_query_loss=step.losses[-1] if step.losses else None,
            status="ok")
    # time / reference, alternating in this process, within most of the cell's limit (the rest: start-up)
    p = paired.measure_paired(cell, step, opts, deadline=started + PAIRED_SHARE * opts.timeout_s)
    warnings = [w for w in (measure.noise_warning(timing, cell.label()),
                            p and p.get("error") and f"{cell.label()}: no paired ratio: {p['error']}",
                            p and p.get("cut") and f"{cell.label()}: paired ratio from {p['cut']}") if w]
    row.set(paired=p, warnings=[*row.row.warnings, *warnings])


def measure_cell_inline(cell: Cell, opts: MeasureOptions) -> CellRow:
    """Measure one cell in this process; never raises for a cell fault (the status says)."""
    row = RowSoFar(base_row(cell))
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        _measure(cell, opts, row, t0)
    except _Unsupported as exc:
        row.set(status="unsupported", message=str(exc))
    except UserCodeError as exc:  # the user's factory or sampler failed: their error, not a variant's refusal
        row.set(status="error", message=str(exc))
    except ConfigError as exc:  # the variant refuses this model (vmaml on BatchNorm, ...): the reason, one line
        row.set(status="unsupported", message=str(exc))
    except Diverged as exc:
        row.set(status="diverged", message=str(exc))
    except Exception as exc:  # noqa: BLE001 -- any fault of the measured code is the cell's status, not a crash
        status, message = failure_status(exc)
        row.set(status=status, message=message)
        if status == "error":
            row.set(traceback=traceback.format_exc(limit=8))
    row.set(wall_s=time.perf_counter() - t0, env=cell_environment(cell.device))
    return row.row


def main(argv: list[str]) -> int:
    """The child's entry point: arm death with the driver, measure, write the row atomically."""
    cell_path, opts_path, out_path = argv
    tmpd = Path(cell_path).parent
    cleanup = (lambda: shutil.rmtree(tmpd, ignore_errors=True)) if tmpd.name.startswith(TEMP_PREFIX) else (lambda: None)
    die_with_parent(int(os.environ.get(PARENT_ENV, os.getppid())), cleanup)
    cell = Cell(**json.loads(Path(cell_path).read_text()))
    opts = MeasureOptions(**json.loads(Path(opts_path).read_text()))
    with distributed.session(cell.device) as group:  # one rank of a ``ranks=N`` cell (harness.bench.process)
        row = measure_cell_inline(cell, opts)
        memory = row.memory or {}
        row = replace(row, distributed=distributed.single_process_summary(memory) if group is None
                      else group.summary(memory))
        if group is None or group.main:
            write_json(Path(out_path), row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
