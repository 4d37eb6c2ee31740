"""Paired time ratios: a cell's meta-step time against its reference's, measured in the same process by
alternating the two, so load that changes during a matrix changes both alike.

Why: cells run one after another, so a CPU time ratio between two cells' medians moves with whatever else the
machine did meanwhile (measured on a loaded machine: ``lr_fo`` 0.14x of ``maml``, 2012 ms against 40 ms quiet,
while the memory figures were identical).  Here the cell's process also builds its reference and times
``pairs`` pairs of meta-steps, one of each on the same task batch, back to back, the order swapped every pair
(A B, B A, A B, ...) so that a drift within a pair favours neither; the ratio of each pair is
``cell / reference`` (below 1: the cell is faster), and the row keeps their median, quartiles, min and max
(``scipy.stats``).  The memory figure is not touched: it is measured in its own pass before this one.

The clock (:func:`clock_for`): on the CPU with one torch thread, the process's CPU time
(``time.process_time``), which leaves out the time the process waited for a core while another process ran;
the wall-clock summary is kept beside it (``wall``).  With more threads (CPU time would add up their spinning)
and on CUDA (asynchronous work, timed with ``synchronize``), the wall clock.  How far the ratios move when
another CPU-bound process runs beside the bench: docs/measurement.md, generated from the committed
``results/cpu-bench-peers`` and ``results/cpu-bench-peers-load`` (``make results`` runs both).

The reference (:func:`reference_name`): a peer cell ``peer:v`` -> our ``v``; our variant -> the registered
variant with the same order and LRs but no checkpointing and no vectorization (``ckpt_lr`` -> ``lr``,
``vmaml`` -> ``maml``, ``sckpt`` -> ``maml``); a variant that is already that (``fo``, ``lr``) -> ``maml``;
``maml`` itself has none.  A cell with a memory budget (``--memory-budget``) is paired against its own variant
unplanned (``lr`` under a budget -> ``lr``): what the chosen checkpointing costs.

Run (a cell's row gets ``paired``; the tables a column ``time / ref (paired)``)::

    python -m harness bench --preset sinusoid --set meta_batch=25 --variants maml,vmaml,higher:maml --peers
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from harness.loop.train import StepRunner
from harness.core.config import ConfigError, Task
from harness.loop.spec import Experiment
from harness.variants import registry

__all__ = ["DEFAULT_PAIRS", "clock_for", "measure_paired", "paired_ratios", "ratio_summary", "reference_name"]

DEFAULT_PAIRS = 21  # enough for a median that holds under load (see the docstring); odd: the median is a pair


def reference_name(variant: str, registry: dict[str, Any]) -> str | None:
    """The cell whose time this cell is paired against (see the module docstring); ``None`` for ``maml``."""
    if ":" in variant:
        return variant.split(":", 1)[1]
    v = registry[variant]
    want = v.reference().flags
    same = [n for n, r in registry.items() if r.flags == want]
    ref = same[0] if same and same[0] != variant else "maml"
    return None if ref == variant else ref


def ratio_summary(ratios: list[float], reference: str) -> dict[str, Any]:
    """Median, quartiles, min and max of the per-pair ratios ``cell / reference``."""
    xs = np.asarray(ratios, dtype=float)
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return {"reference": reference, "order": "alternating", "pairs": int(xs.size), "ratios": [float(x) for x in xs],
            "median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(xs.min()), "max": float(xs.max())}


def clock_for(device: str) -> str:
    """``"cpu"`` (process CPU time) on the CPU with one torch thread, else ``"wall"``; see the docstring."""
    return "cpu" if torch.device(device).type == "cpu" and torch.get_num_threads() == 1 else "wall"


def _timed(step: Callable[[list[Task]], float], tasks: list[Task], cuda: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    step(tasks)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_ratios(cell_step: Callable[[list[Task]], float], ref_step: Callable[[list[Task]], float],
                  sample: Callable[[], list[Task]], pairs: int, reference: str, *, warmup: int = 1,
                  device: str = "cpu", deadline: float | None = None) -> dict[str, Any]:
    """``pairs`` x (cell step, reference step) on the same fresh batch, the order swapped every pair;
    :func:`ratio_summary` of the ratios on the clock of :func:`clock_for`, with the wall clock's as ``wall``.

    ``deadline`` (``time.perf_counter`` seconds): no pair is started that the last one's duration says would
    end after it; the result then has fewer pairs and says so in ``cut`` (at least one pair is timed)."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    cuda, clock = torch.device(device).type == "cuda", clock_for(device)
    for _ in range(warmup):
        tasks = sample()
        cell_step(tasks)
        ref_step(tasks)
    wall, cpu, cut, last = [], [], None, 0.0
    for i in range(pairs):
        if deadline is not None and i > 0 and time.perf_counter() + last > deadline:
            cut = f"{i} of {pairs} pairs: the next would end past the cell's time budget"
            break
        tasks = sample()
        if i % 2 == 0:
            a = _timed(cell_step, tasks, cuda)
            b = _timed(ref_step, tasks, cuda)
        else:
            b = _timed(ref_step, tasks, cuda)
            a = _timed(cell_step, tasks, cuda)
        wall.append(a[0] / b[0])
        cpu.append(a[1] / b[1] if b[1] > 0 else float("nan"))
        last = a[0] + b[0]
    out = {**ratio_summary(cpu if clock == "cpu" else wall, reference), "clock": clock}
    if cut:
        out["cut"] = cut
    if clock == "cpu":
        out["wall"] = ratio_summary(wall, reference)
    return out


def measure_paired(cell: Any, step: Any, opts: Any, deadline: float | None = None) -> dict[str, Any] | None:
    """In a cell's process, after its own measurement: build the reference (same preset, settings, seed and
    task stream) and time ``opts.pairs`` alternating pairs (default :data:`DEFAULT_PAIRS`) before ``deadline``.
    ``None`` for a cell without a reference.  A reference that cannot be built or run (a ConfigError, a
    runtime or out-of-memory error) is kept as ``{"reference", "error"}`` and leaves the cell's figures
    alone; anything else is a bug and fails the cell."""
    budgeted = cell.peer is None and cell.settings.get("memory_budget")
    ref = cell.base_variant if budgeted else reference_name(cell.variant, registry())
    if ref is None:
        return None
    losses = getattr(step, "losses", None)
    kept = len(losses) if losses is not None else 0
    try:
        spec = replace(cell, variant=ref).run_spec()
        variant = spec.variant_obj
        if cell.peer is None:  # a cell-level step_ckpt/vectorize setting is not the reference's
            variant = replace(variant.reference(), name=variant.name)
        exp = Experiment(spec, variant=variant)
        ref_step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample, scaler=exp.new_scaler())
        if deadline is not None and time.perf_counter() > deadline:
            return {"reference": ref, "error": "no time left in the cell's time budget"}
        return paired_ratios(step, ref_step, step.sample, opts.pairs or DEFAULT_PAIRS, ref,
                             warmup=max(min(opts.warmup, 1), 0), device=cell.device, deadline=deadline)
    except (ConfigError, RuntimeError, MemoryError, ValueError) as exc:  # RuntimeError: torch's, OOM, Diverged
        return {"reference": ref, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if losses is not None:
            del losses[kept:]  # the row's losses are the cell's measured steps only
