"""The matrix: many cells, each measured once, resumable, and safe to share between processes.

:func:`run_matrix` measures every cell of a request that ``<run-dir>/cells.jsonl`` does not already hold,
one at a time through an executor (today :class:`~harness.bench.process.LocalExecutor`: a process per cell,
forked from a pre-imported server, :mod:`harness.bench.forked`), and merges each row into the file under the directory's lock the moment it is measured
(``harness.bench.store``).  So:

* **duplicates** in one request (``--variants maml,maml``) are one cell;
* **resume**: a cell is finished when it has a row measured with the same options -- all of them but the time
  limit, which bounds a measurement without changing it; a ``timeout`` row is re-run when the limit grew;
* **concurrent runs** on one run-id keep every row exactly once, and a cell another process is measuring
  (a live claim) is awaited, not measured twice; if that process dies, its cell is taken over;
* :func:`matrix_exit_code` turns the rows into the command's exit code (0 only ok/unsupported, else 1).

Try it: ``python -m harness bench --variants maml,fo --run-id m`` twice; the second skips both cells.
"""
from __future__ import annotations

import functools
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from tqdm import tqdm

from harness.bench.cells import PASSING_STATUSES, Cell, MeasureOptions, base_row, dedup_cells
from harness.bench.child import peer_precheck
from harness.bench.process import CellExecutor, LocalExecutor, cell_environment, signals_as_interrupts
from harness.bench.store import (LOCK_WAIT_S, RunDirBusy, check_claims, claim_cell, live_claim, merge_rows, read_rows,
                                 release_cell, run_dir_lock)
from harness.reporting.schema import CellRow
from harness.variants import get_variant

__all__ = ["run_matrix", "measure_cell", "matrix_exit_code", "is_finished", "LOCAL", "FRESH", "BatchExecutor",
           "measure_here", "lost_cell_row"]

LOCAL = LocalExecutor()
FRESH = LocalExecutor(fork=False)  # a batch executor's worker is already a fresh process per cell: no server there
POLL_S = 0.5  # how often a run re-reads the file while another process measures one of its cells


def matrix_exit_code(rows: Iterable[CellRow]) -> int:
    """0 when every cell is ``ok`` or ``unsupported``; 1 when any failed, diverged, timed out, was killed or
    ran out of memory (what ``bench`` and ``sweep`` exit with after writing their results)."""
    return 0 if all(r.status in PASSING_STATUSES for r in rows) else 1


def is_finished(row: CellRow | None, opts: MeasureOptions) -> bool:
    """Whether ``row`` is this cell measured as ``opts`` would: same options but the time limit, and not a
    ``timeout`` under a shorter limit than ``opts``'s."""
    if row is None:
        return False
    stored = dict(row.measure_opts or {})
    limit = stored.get("timeout_s")
    if MeasureOptions.identity_of(stored) != opts.identity():
        return False
    return not (row.status == "timeout" and (limit is None or opts.timeout_s > limit))


def measure_cell(cell: Cell, opts: MeasureOptions, executor: CellExecutor = LOCAL) -> CellRow:
    """One cell's row: a peer cell that cannot run is ``unsupported`` without a process, others go to
    ``executor``."""
    why = peer_precheck(cell)
    if why is None:
        return executor.measure(cell, opts)
    return replace(base_row(cell), flags=get_variant(cell.base_variant).flags, status="unsupported", message=why,
                   wall_s=0.0, env=cell_environment(cell.device))


class BatchExecutor(Protocol):
    """Runs many cells at once (``harness.bench.executors.RayExecutor``): ``fn`` on every item, yielding
    ``(item, fn(item))`` as each finishes, ``failed(item, reason)`` for one it lost."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, failed: Callable[[Any, str], Any],
            gpu: bool = False) -> Iterator[tuple[Any, Any]]: ...


def measure_here(opts_of: Callable[[Cell], MeasureOptions], cell: Cell) -> CellRow:
    """A batch executor's job: the cell measured where the job runs, as ``local`` measures it (in a fresh
    interpreter: a fork server per Ray worker would cost what it saves)."""
    return measure_cell(cell, opts_of(cell), FRESH)


def lost_cell_row(cell: Cell, reason: str) -> CellRow:
    """The ``error`` row of a cell its executor lost (its Ray worker died, say)."""
    return replace(base_row(cell), status="error", message=reason, wall_s=None, env=cell_environment(cell.device))


@dataclass
class _Run:
    """One run_matrix call: where it writes, in what order, how cells are measured."""

    run_dir: Path
    order: list[str]
    opts_of: Callable[[Cell], MeasureOptions]
    executor: CellExecutor
    force: bool
    lock_wait_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def lock(self):  # noqa: ANN201
        return run_dir_lock(self.run_dir, self.lock_wait_s)

    def measure_unless_taken(self, cell: Cell) -> CellRow | str:
        """The cell's new row; ``"done"`` if another process measured it meanwhile, ``"elsewhere"`` if
        another process is measuring it now."""
        key, opts = cell.key(), self.opts_of(cell)
        with self.lock():
            if not self.force and is_finished(read_rows(self.run_dir).get(key), opts):
                return "done"
            if claim_cell(self.run_dir, key, opts.timeout_s) is not None:
                return "elsewhere"
        try:
            row = self.stamped(measure_cell(cell, opts, self.executor), opts)
            with self.lock():
                merge_rows(self.run_dir, [row], self.order)
                release_cell(self.run_dir, key)
        except BaseException:
            self._release_quietly(key)  # a claim of a dead pid is stale anyway; this only speeds up the others
            raise
        return row

    def measure_batch(self, cells: list[Cell], bar: tqdm) -> list[Cell]:
        """Claim ``cells`` and hand them all to a batch executor at once, merging each row as it arrives;
        returns the cells another process is measuring.  Claims last as if the cells ran one at a time."""
        claimed, elsewhere = [], []
        with self.lock():
            rows = read_rows(self.run_dir)
            for c in cells:
                if not self.force and is_finished(rows.get(c.key()), self.opts_of(c)):
                    continue
                bound = self.opts_of(c).timeout_s * len(cells)
                (elsewhere if claim_cell(self.run_dir, c.key(), bound) is not None else claimed).append(c)
        open_keys = {c.key() for c in claimed}
        try:
            finished = self.executor.map(functools.partial(measure_here, self.opts_of), claimed,
                                         failed=lost_cell_row, gpu=any(c.device == "cuda" for c in claimed))
            with closing(finished):  # an exception here closes it: the executor cancels the rest
                for cell, measured in finished:
                    row = self.stamped(measured, self.opts_of(cell))
                    with self.lock():
                        merge_rows(self.run_dir, [row], self.order)
                        release_cell(self.run_dir, cell.key())
                    open_keys.discard(cell.key())
                    bar.update(1)
                    bar.set_postfix_str(cell.variant)
                    _report(bar, cell, row)
        finally:
            for key in open_keys:
                self._release_quietly(key)
        return elsewhere

    def stamped(self, row: CellRow, opts: MeasureOptions) -> CellRow:
        """A measured row with this run's id, the options it was measured with and the request's fields."""
        return replace(row, run_id=self.run_dir.name, measure_opts=asdict(opts), **self.extra)

    def _release_quietly(self, key: str) -> None:
        try:
            with run_dir_lock(self.run_dir, wait_s=2.0):
                release_cell(self.run_dir, key)
        except (OSError, RunDirBusy):  # already unwinding; the claim goes stale when this process ends
            pass

    def await_others(self, cells: list[Cell], log: Callable[[str], None]) -> None:
        """Wait for cells another process is measuring; take over those whose process stopped."""
        if cells:
            log(f"waiting for {len(cells)} cell(s) another process is measuring in {self.run_dir}")
        while cells:
            time.sleep(POLL_S)
            with self.lock():
                rows = read_rows(self.run_dir)
                gone = [c for c in cells if live_claim(self.run_dir, c.key()) is None]
            cells = [c for c in cells if c not in gone]
            for c in gone:  # finished, or its process died or was interrupted without a row
                if not is_finished(rows.get(c.key()), self.opts_of(c)):
                    result = self.measure_unless_taken(c)
                    if result == "elsewhere":
                        cells.append(c)


def _report(bar: tqdm, cell: Cell, row: CellRow) -> None:
    if row.status != "ok":
        bar.write(f"{cell.label()}: {row.status}" + (f" ({row.message})" if row.message else ""))
    for w in row.warnings or []:
        bar.write(w)


def run_matrix(cells: Iterable[Cell], run_dir: Path, opts: MeasureOptions | Callable[[Cell], MeasureOptions], *,
               force: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
               extra: dict[str, Any] | None = None, executor: CellExecutor | BatchExecutor = LOCAL,
               lock_wait_s: float = LOCK_WAIT_S) -> list[CellRow]:
    """Measure every cell not finished in ``run_dir/cells.jsonl`` (all of them with ``force``), each through
    ``executor``, merging each row into the file as it comes; returns the request's rows in its order.

    SIGTERM and SIGHUP stop it as Ctrl-C does (:class:`~harness.bench.process.Interrupted`, the running cell
    killed); :class:`~harness.bench.store.RunDirBusy` when the directory's lock stays held ``lock_wait_s``.
    """
    asked = list(cells)
    cells = dedup_cells(asked)
    log = log or (lambda s: print(s, file=sys.stderr))
    if len(cells) < len(asked):
        log(f"collapsed {len(asked) - len(cells)} duplicate cell(s) (same variant, preset, device, dtype, "
            "settings and seed)")
    run = _Run(Path(run_dir), [c.key() for c in cells], opts if callable(opts) else (lambda c: opts),
               executor, force, lock_wait_s, dict(extra or {}))
    with signals_as_interrupts():
        with run.lock():
            check_claims(run.run_dir)  # a malformed claim or a linked .running: refused before any cell
            existing = read_rows(run.run_dir)
        todo = [c for c in cells if force or not is_finished(existing.get(c.key()), run.opts_of(c))]
        if len(todo) < len(cells):
            log(f"resuming {run.run_dir}: skipping {len(cells) - len(todo)} finished cell(s), running {len(todo)} "
                "(--force re-runs all)")
        elsewhere: list[Cell] = []
        bar = tqdm(total=len(todo), desc=f"cells -> {run.run_dir.name}", unit="cell", file=sys.stderr,
                   disable=None if progress else True)  # counts finished cells
        if hasattr(executor, "map"):  # many at once (Ray)
            elsewhere = run.measure_batch(todo, bar)
        for cell in [] if hasattr(executor, "map") else todo:
            bar.set_postfix_str(cell.variant)
            result = run.measure_unless_taken(cell)
            bar.update(1)
            if result == "elsewhere":
                elsewhere.append(cell)
            elif isinstance(result, CellRow):
                _report(bar, cell, result)
        bar.close()
        run.await_others(elsewhere, log)
        with run.lock():
            rows = read_rows(run.run_dir)
    return [rows[k] for k in run.order if k in rows]
