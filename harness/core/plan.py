"""The memory planner's cost model: measured costs of one inner step -> the predicted peak and time of every
exact configuration -> the fastest one that fits a budget.  Pure functions; the measuring is
:mod:`harness.bench.planner`'s.

The costs (:class:`StepCosts`, MiB and seconds, one set with per-layer checkpointing off and one with it on)
come from four small meta-steps of the actual model and task: K = 1 and 2, without step checkpointing and with
segments of one step.  Their differences give what one more inner step adds without step checkpointing
(``step_slope``, a weight copy W plus one step's double-backward graph G) and with it (``weights``, W).  A
configuration's peak is then (MiB):

* no step checkpointing: ``plain_first + (K - 1) * step_slope``;
* segments of n (``step_ckpt=n``): ``sched_first + max_j (j * W + (L_j - 1) * segment_slope)`` over the
  segments j = 0, 1, ... of lengths L_j (segment j holds the inputs of the j segments after the first; its
  backward rebuilds L_j steps' graphs at once; ``segment_slope``, measured by a segment of two steps at K = 2,
  is ``step_slope`` in second order and more than W in first order);
* a schedule (``step_rebuild="step"`` or ``snapshots=s``): ``sched_first + copies(schedule) * W``, with
  :func:`weight_copies` the most weight-sized tensors alive at once beyond a one-step run (stored snapshots,
  the working state, the adjoint, a values-only step's input and output), walked over the schedule's actions;
* vectorized (``vmap_chunk=c``): bilinear in K and c through four probes (K, c in {1, 2}).

Learnable per-step LRs add ``lr_step`` per inner step to every peak (their meta-gradients).  Time (seconds):
``base_s + K * graph_s + values_only * values_s`` (the schedule's values-only step evaluations; K for segments,
0 without step checkpointing), vectorized ``K * (chunks * chunk_s + tasks * task_s)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from harness.core.config import ConfigError
from harness.core.schedules import Advance, Load, Rebuild, Schedule, Store, binomial, one_step_segments

__all__ = ["Candidate", "Prediction", "StepCosts", "VectorCosts", "candidates", "choose", "predict",
           "schedule_counts", "segment_copies", "snapshot_choices", "weight_copies"]

FEW_SNAPSHOTS = 12  # binomial: every s up to this, then a few more (Revolve's schedule is slow to build at large K)
MORE_SNAPSHOTS = (16, 24, 32)


@dataclass(frozen=True)
class StepCosts:
    """One inner step's measured costs (MiB, seconds), per-layer checkpointing off or on."""

    plain_first: float  # peak of a meta-step with K = 1 and no step checkpointing
    step_slope: float  # what one more inner step adds to it, per-step LRs' share aside: W + G
    sched_first: float  # peak of a meta-step with K = 1 under step checkpointing
    weights: float  # W: what one more inner step adds under segments of one step, per-step LRs' share aside
    graph_s: float  # seconds of one inner step with its graph and its share of the outer backward
    values_s: float  # seconds of one values-only inner step
    base_s: float = 0.0  # seconds of the rest of a meta-step (query loss, outer update)
    lr_step: float = 0.0  # per-step learnable LRs: their meta-gradient's MiB per inner step
    segment_slope: float | None = None  # what each more step of a segment adds to its rebuild; None: step_slope
    first_order: bool = False  # no double backward: a rebuild allocates no new adjoint, an advance no second state


@dataclass(frozen=True)
class VectorCosts:
    """A vectorized meta-step's measured peaks at K, c in {1, 2} (``peaks[(K, c)]``, MiB) and time split."""

    peaks: dict[tuple[int, int], float]
    chunk_s: float  # seconds per vmapped chunk per inner step
    task_s: float  # seconds per task per inner step


@dataclass(frozen=True)
class Candidate:
    """One exact configuration: what the planner sets on the variant."""

    layer_ckpt: bool = False
    step_ckpt: int = 0
    step_rebuild: str = "segment"
    snapshots: int = 0
    vmap_chunk: int = 0  # vectorized: tasks per vmapped chunk (0: the variant is not vectorized)

    def settings(self) -> dict[str, bool | int | str]:
        """The fields it sets, the same names on a Variant and a MetaConfig (vectorized: the chunk only)."""
        if self.vmap_chunk:
            return {"vmap_chunk": self.vmap_chunk}
        return {"layer_ckpt": self.layer_ckpt, "step_ckpt": self.step_ckpt, "step_rebuild": self.step_rebuild,
                "snapshots": self.snapshots}

    def text(self) -> str:
        if self.vmap_chunk:
            return f"vmap_chunk={self.vmap_chunk}"
        step = (f"snapshots={self.snapshots}" if self.snapshots else
                f"step_ckpt={self.step_ckpt},step_rebuild={self.step_rebuild}" if self.step_ckpt else "no step_ckpt")
        return f"layer_ckpt={'on' if self.layer_ckpt else 'off'},{step}"


@dataclass(frozen=True)
class Prediction:
    candidate: Candidate
    peak_mib: float
    time_s: float


def snapshot_choices(steps: int) -> list[int]:
    """The binomial snapshot counts tried: 1..FEW_SNAPSHOTS and MORE_SNAPSHOTS, each below K."""
    return [s for s in [*range(1, FEW_SNAPSHOTS + 1), *MORE_SNAPSHOTS] if s < steps]


def candidates(steps: int, *, layer_options: Iterable[bool] = (False, True), vectorized: bool = False,
               meta_batch: int = 1) -> list[Candidate]:
    """Every configuration the planner weighs for K = ``steps``: vectorized, the chunk sizes 1..meta_batch;
    otherwise, per layer option, no step checkpointing, segments of 1..K, segments of 2..ceil(sqrt K) rebuilt
    one step at a time (longer ones cost more time and memory) and binomial with :func:`snapshot_choices`."""
    if vectorized:
        return [Candidate(vmap_chunk=c) for c in range(1, meta_batch + 1)]
    out = []
    for layer in layer_options:
        out.append(Candidate(layer))
        if steps < 2:
            continue
        out += [Candidate(layer, step_ckpt=n) for n in range(1, steps + 1)]
        out += [Candidate(layer, step_ckpt=n, step_rebuild="step") for n in range(2, min(steps - 1, math.isqrt(steps - 1) + 1) + 1)]
        out += [Candidate(layer, snapshots=s) for s in snapshot_choices(steps)]
    return out


def weight_copies(schedule: Schedule, first_order: bool = False) -> int:
    """The most weight-sized tensors beyond a one-step run's alive at once under ``schedule``: the stored
    snapshots other than the initial one (the initial weights are alive anyway) with the working state at each
    rebuild, plus the adjoint propagated by every rebuild after the first (the incoming one stays alive through
    the whole backward: autograd holds it), and with a values-only step's input and output at each advance.
    First order (the adjoint passes through ``w - lr * g`` unchanged, and a step's activations, not its states,
    are the transient): the stored snapshots with the state each rebuild or values-only step produces or starts
    from.  Matches the CPU figure on ``cpu-bench`` in every case measured (tests/test_planner.py)."""
    held: set[int] = set()
    peak = 0

    def count(extra: int, *alive: int) -> None:
        nonlocal peak
        peak = max(peak, len((held | set(alive)) - {0}) + extra)

    for phase in (schedule.forward, schedule.backward):
        for a in phase:
            if isinstance(a, Store):
                held.add(a.n)
            elif isinstance(a, Load) and a.drop:
                held.discard(a.n)
            elif isinstance(a, Advance):
                for j in range(a.n0, a.n1):
                    count(0, *((j + 1,) if first_order else (j, j + 1)))
            elif isinstance(a, Rebuild):
                count(int(a.n < schedule.steps - 1 and not first_order), a.n)
    return peak


def segment_copies(steps: int, length: int, slope_in_weights: float) -> float:
    """Segments of ``length``: the most ``j + (L_j - 1) * slope`` (in weight copies) over segments j."""
    starts = range(0, steps, length)
    return max(j + (min(start + length, steps) - start - 1) * slope_in_weights for j, start in enumerate(starts))


@functools.lru_cache(maxsize=4096)
def schedule_counts(steps: int, snapshots: int, step_ckpt: int, first_order: bool) -> tuple[int, int]:
    """(weight copies, values-only steps) of binomial(``steps``, ``snapshots``) or, without snapshots, one-step
    rebuilds of segments of ``step_ckpt``: pure, cached (walking Revolve's schedule at K = 1024 takes seconds, and
    every layer option and budget of a run weighs the same schedules)."""
    schedule = binomial(steps, snapshots) if snapshots else one_step_segments(steps, step_ckpt)
    return weight_copies(schedule, first_order), schedule.values_only()


def predict(c: Candidate, costs: dict[bool, StepCosts] | VectorCosts, steps: int, meta_batch: int = 1) -> Prediction:
    """The predicted peak (MiB) and time (s) of one meta-step under ``c`` (``costs``: per layer option, or
    vectorized)."""
    if isinstance(costs, VectorCosts):
        p = costs.peaks
        k1, ch = steps - 1, c.vmap_chunk - 1
        peak = (p[1, 1] + k1 * (p[2, 1] - p[1, 1]) + ch * (p[1, 2] - p[1, 1])
                + k1 * ch * (p[2, 2] - p[2, 1] - p[1, 2] + p[1, 1]))
        time = steps * (math.ceil(meta_batch / c.vmap_chunk) * costs.chunk_s + meta_batch * costs.task_s)
        return Prediction(c, peak, time)
    s = costs[c.layer_ckpt]
    lrs = (steps - 1) * s.lr_step
    if not (c.step_ckpt or c.snapshots):
        return Prediction(c, s.plain_first + (steps - 1) * s.step_slope + lrs, s.base_s + steps * s.graph_s)
    if c.step_rebuild == "segment" and not c.snapshots:
        slope = (s.step_slope if s.segment_slope is None else s.segment_slope) / s.weights if s.weights > 0 else 0.0
        copies, values_only = segment_copies(steps, c.step_ckpt, slope), steps
    else:
        copies, values_only = schedule_counts(steps, c.snapshots, c.step_ckpt, s.first_order)
    return Prediction(c, s.sched_first + copies * s.weights + lrs, s.base_s + steps * s.graph_s + values_only * s.values_s)


def choose(predictions: Sequence[Prediction], budget_mib: float) -> Prediction:
    """The fastest predicted configuration whose predicted peak fits ``budget_mib`` (ties: the smaller peak);
    a ConfigError naming the smallest peak possible when none fits."""
    fits = [p for p in predictions if p.peak_mib <= budget_mib]
    if not fits:
        best = min(predictions, key=lambda p: p.peak_mib)
        raise ConfigError(f"memory budget {budget_mib:.4g} MiB is below every exact configuration's predicted peak; "
                          f"the smallest possible is {best.peak_mib:.4g} MiB ({best.candidate.text()}); "
                          f"give --memory-budget of at least {math.ceil(best.peak_mib * 100) / 100:g}MiB")
    return min(fits, key=lambda p: (p.time_s, p.peak_mib))
