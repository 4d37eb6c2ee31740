"""``--memory-budget``: measure one inner step of the actual model and task, predict every exact configuration's
peak and time (:mod:`harness.core.plan`) and run the fastest predicted to fit.

The probe runs small meta-steps on copies of the learner and on one meta-batch of the cell's own tasks, drawn
from a copy of its task stream (the run itself is unchanged): K = 1 and 2, without step checkpointing and with
segments of one step, per-layer checkpointing off and on (vectorized variants: K, vmap_chunk in {1, 2}).  Memory
is the figure the row reports, ``cpu_peak_alloc_mib`` (:func:`harness.bench.measure.measure_cpu_memory`: live
tensor bytes allocated during a meta-step, beyond the model and its optimizer state; on CUDA too, so no
allocator cache or context); time the fastest of three untracked meta-steps.  Learnable LR, order, precision and
the model come from the variant and cell; the planner sets only per-layer and step checkpointing (segment length,
one-step rebuild, binomial snapshots) or ``vmap_chunk``, all exact.  A budget nothing fits is a ConfigError
naming the smallest possible peak (exit 2), raised before any meta-step of the run.

In one's own loop: ``learner, plan = plan_learner(learner, tasks, budget_bytes)``.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence, TextIO

import torch

from harness.bench.cells import Cell
from harness.bench.measure import MIB, measure_cpu_memory
from harness.core.config import ConfigError, MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.core.plan import Candidate, Prediction, StepCosts, VectorCosts, candidates, choose, predict
from harness.loop import distributed
from harness.loop.spec import Experiment
from harness.loop.train import StepRunner

__all__ = ["MemoryPlan", "plan_cell", "plan_cells", "plan_experiment", "plan_learner", "planned_variant", "probe_costs",
           "probe_vector"]

TIMED = 3  # untracked meta-steps per timing; the fastest counts
TIMED_STEPS = 4  # the inner steps of the longer timed meta-step (its difference to K = 1: 3 steps' time)
OUTER_LR = 1e-3


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen configuration, its prediction, the budget and how many configurations were weighed."""

    chosen: Prediction
    budget_mib: float
    weighed: int
    plain: Prediction | None = None  # no checkpointing (vectorized: all tasks in one chunk), for the time ratio

    @property
    def text(self) -> str:
        return self.chosen.candidate.text()

    def line(self, label: str) -> str:
        ratio = (f", {self.chosen.time_s / self.plain.time_s:.2f}x the time of {self.plain.candidate.text()}"
                 if self.plain is not None and self.plain.time_s > 0 else "")
        return (f"plan for {label} (memory budget {self.budget_mib:.4g} MiB, {self.weighed} exact configurations): "
                f"{self.text}, predicted peak {self.chosen.peak_mib:.4g} MiB{ratio}")

    def fields(self) -> dict[str, Any]:
        """What the row records: ``plan`` and ``predicted_peak_mib``."""
        return {"plan": self.text, "predicted_peak_mib": self.chosen.peak_mib}

    def to_json(self) -> dict[str, Any]:
        """The plan as the driver hands it to the cell's process (``Cell.memory_plan``): applied there as it is."""
        return {"candidate": asdict(self.chosen.candidate), "peak_mib": self.chosen.peak_mib,
                "time_s": self.chosen.time_s, "budget_mib": self.budget_mib, "weighed": self.weighed}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "MemoryPlan":
        return MemoryPlan(Prediction(Candidate(**d["candidate"]), d["peak_mib"], d["time_s"]), d["budget_mib"],
                          d["weighed"])


def _copy(learner: MetaLearner, **changes: Any) -> MetaLearner:
    cfg = replace(learner.cfg, memory_budget=None, **changes)
    return MetaLearner(copy.deepcopy(learner.model), cfg, learner.loss_fn).to(_device(learner))


def _device(learner: MetaLearner) -> torch.device:
    return next(learner.model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(learner: MetaLearner, tasks: list[Task], scaler: Any) -> StepRunner:
    return StepRunner(learner, OUTER_LR, lambda: tasks, scaler=scaler, check_finite=False)


def _peak(learner: MetaLearner, tasks: list[Task], warmup: bool, scaler: Any) -> float:
    """The peak MiB of one tracked meta-step (after one untracked one with ``warmup``, as bench measures)."""
    step = _runner(learner, tasks, scaler)
    if warmup:
        step(tasks)
    return measure_cpu_memory(step, tasks)["cpu_peak_alloc_mib"]


def _fastest(steps: Sequence[StepRunner], tasks: list[Task]) -> list[float]:
    """Seconds of each meta-step runner, the fastest of TIMED rounds, taken in turn (after a warm-up each)."""
    best = [float("inf")] * len(steps)
    dev = _device(steps[0].learner)
    for round_ in range(TIMED + 1):
        for i, step in enumerate(steps):
            _sync(dev)
            t0 = time.perf_counter()
            step(tasks)
            _sync(dev)
            if round_:
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _values_only_s(learner: MetaLearner, tasks: list[Task]) -> float:
    """Seconds of one values-only inner step on every task of the meta-batch (the fastest of TIMED)."""
    dev, best = _device(learner), float("inf")
    for _ in range(TIMED):
        _sync(dev)
        t0 = time.perf_counter()
        for t in tasks:
            learner.inner_loop(learner.initial_weights(), learner.lr_values(), t.support_x, t.support_y, range(1),
                               build_graph=False)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def _lr_step_mib(learner: MetaLearner) -> float:
    """Per-step learnable LRs: the MiB of their meta-gradient per inner step (0 otherwise)."""
    if learner.lrs is None or not learner.cfg.lr_per_step:
        return 0.0
    total = sum(p.numel() * p.element_size() for p in learner.lrs.raw.values())
    return total / max(learner.cfg.inner_steps, 1) / MIB


def probe_costs(learner: MetaLearner, tasks: list[Task], layer_ckpt: bool, *, warmup: bool = True,
                scaler: Any = None) -> StepCosts:
    """One inner step's costs on ``learner``'s model and ``tasks`` with per-layer checkpointing ``layer_ckpt``:
    peaks at K = 1, 2 without step checkpointing and with segments of one step, at K = 2 with one segment of two;
    seconds at K = 1 and
    :data:`TIMED_STEPS` without (their difference: the time of an inner step with its graph)."""
    def copy_at(k: int, segments: int) -> MetaLearner:
        return _copy(learner, inner_steps=k, layer_ckpt=layer_ckpt, step_ckpt=segments, snapshots=0,
                     step_rebuild="segment")

    plain = {k: _peak(copy_at(k, 0), tasks, warmup, scaler) for k in (1, 2)}
    seg = {k: _peak(copy_at(k, 1), tasks, warmup, scaler) for k in (1, 2)}
    two_step_segment = _peak(copy_at(2, 2), tasks, warmup, scaler)
    lr_step = _lr_step_mib(_copy(learner, inner_steps=2))
    one, many = _fastest([_runner(copy_at(1, 0), tasks, scaler), _runner(copy_at(TIMED_STEPS, 0), tasks, scaler)],
                         tasks)
    graph_s = max(many - one, 0.0) / (TIMED_STEPS - 1)
    return StepCosts(plain_first=plain[1], step_slope=plain[2] - plain[1] - lr_step, sched_first=seg[1],
                     weights=seg[2] - seg[1] - lr_step, graph_s=graph_s, values_s=_values_only_s(copy_at(1, 0), tasks),
                     base_s=max(one - graph_s, 0.0), lr_step=lr_step, segment_slope=two_step_segment - seg[1] - lr_step,
                     first_order=learner.cfg.first_order)


def probe_vector(learner: MetaLearner, tasks: list[Task], *, warmup: bool = True, scaler: Any = None) -> VectorCosts:
    """A vectorized meta-step's peaks at K, vmap_chunk in {1, 2} and its time per chunk and per task."""
    chunks = (1, 2) if len(tasks) > 1 else (1,)
    peaks = {(k, c): _peak(_copy(learner, inner_steps=k, vmap_chunk=c), tasks, warmup, scaler)
             for k in (1, 2) for c in chunks}
    times = _fastest([_runner(_copy(learner, inner_steps=TIMED_STEPS, vmap_chunk=c), tasks, scaler) for c in chunks],
                     tasks)
    n = len(tasks)
    if n == 1:
        peaks.update({(k, 2): peaks[k, 1] for k in (1, 2)})
        return VectorCosts(peaks, chunk_s=times[0] / TIMED_STEPS, task_s=0.0)
    chunk_s = max((times[0] - times[1]) / (TIMED_STEPS * (n - -(-n // 2))), 0.0)
    return VectorCosts(peaks, chunk_s=chunk_s, task_s=max(times[0] / (TIMED_STEPS * n) - chunk_s, 0.0))


def _applied(learner: MetaLearner, c: Candidate) -> MetaLearner:
    """The learner under ``c`` (same model and LRs)."""
    out = MetaLearner(learner.model, replace(learner.cfg, **c.settings()), learner.loss_fn)
    out.lrs = learner.lrs
    return out


def _refuse_unplannable(cfg: MetaConfig) -> None:
    if cfg.lr_per_step:  # measured: lr, element LRs per step, K = 16: predicted 18.9 MiB, measured 44.3
        raise ConfigError("memory_budget is not planned for lr_per_step=True yet: the per-step LRs' gradients grow "
                          "with K faster than the K = 1, 2 probe sees; valid: lr_per_step=False, or no memory budget")
    chosen_already = [f"{k}={v}" for k, v in (("layer_ckpt", cfg.layer_ckpt), ("step_ckpt", cfg.step_ckpt),
                                               ("snapshots", cfg.snapshots), ("vmap_chunk", cfg.vmap_chunk)) if v]
    if chosen_already:  # the planner chooses these itself: it would silently replace the ones given
        raise ConfigError(f"memory_budget chooses the checkpointing itself, and this variant already sets "
                          f"{', '.join(chosen_already)}; valid: a variant without checkpointing (maml, fo, lr, lr_fo, "
                          "vmaml, ...) and no --set step_ckpt/snapshots/vmap_chunk, or no memory budget")


def plan_learner(learner: MetaLearner, tasks: list[Task], budget_bytes: int, *, warmup: bool = True,
                 scaler: Any = None) -> tuple[MetaLearner, MemoryPlan]:
    """The learner under the fastest exact configuration predicted to fit ``budget_bytes`` (same model and
    LRs), and the plan; a ConfigError naming the smallest possible peak when nothing fits."""
    cfg, state = learner.cfg, torch.random.get_rng_state()
    _refuse_unplannable(cfg)
    steps, budget = cfg.inner_steps, budget_bytes / MIB
    try:
        if cfg.vectorize:
            costs: dict[bool, StepCosts] | VectorCosts = probe_vector(learner, tasks, warmup=warmup, scaler=scaler)
            weighed = candidates(steps, vectorized=True, meta_batch=len(tasks))
        else:
            costs = {}
            for layer in (False, True):
                try:
                    costs[layer] = probe_costs(learner, tasks, layer, warmup=warmup, scaler=scaler)
                except ConfigError:  # the model refuses per-layer checkpointing: plan without it
                    if not layer:
                        raise
            weighed = candidates(steps, layer_options=tuple(costs))
    finally:
        torch.random.set_rng_state(state)
    predictions = [predict(c, costs, steps, len(tasks)) for c in weighed]
    chosen = choose(predictions, budget)
    plan = MemoryPlan(chosen, budget, len(predictions), predictions[-1] if cfg.vectorize else predictions[0])
    return _applied(learner, chosen.candidate), plan


def planned_variant(exp: Experiment, c: Candidate) -> Any:
    """The experiment's variant with the chosen checkpointing (the row's ``flags``)."""
    return replace(exp.variant, **c.settings())


def _ranks(exp: Experiment) -> int:
    """The data-parallel ranks the experiment runs on: a cell's ``ranks`` setting, or torchrun's world."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) if distributed.launched() else 1
    return max(int(exp.spec.settings.launch.get("ranks", 1)), launched)


def plan_experiment(exp: Experiment, *, warmup: bool = True,
                    given: MemoryPlan | None = None) -> tuple[Experiment, MemoryPlan | None]:
    """The experiment planned for its variant's memory budget (``(exp, None)`` without one), probed on one
    meta-batch from a copy of its task stream; with ``given`` (the driver's plan of a bench cell) its choice is
    applied without probing, so the row records the plan the driver printed."""
    budget = exp.variant.memory_budget
    if not budget:
        return exp, None
    if _ranks(exp) > 1:  # each rank would probe and choose on its own shard of the meta-batch
        raise ConfigError(f"memory_budget is not planned across data-parallel ranks (ranks={_ranks(exp)}): each rank "
                          "would plan on its own shard; valid: ranks=1, or no memory budget")
    if given is not None:
        _refuse_unplannable(exp.learner.cfg)
        learner, plan = _applied(exp.learner, given.chosen.candidate), given
    else:
        gen = torch.Generator().manual_seed(0)
        gen.set_state(exp.gen.get_state())
        learner, plan = plan_learner(exp.learner, exp.sample(gen), budget, warmup=warmup, scaler=exp.new_scaler())
    out = copy.copy(exp)
    out.learner, out.variant = learner.to(exp.device), planned_variant(exp, plan.chosen.candidate)
    return out, plan


def plan_cell(cell: Cell, *, warmup: bool = True) -> MemoryPlan | None:
    """A bench cell's plan, made in the driver before any cell runs (handed to the cell's process in
    ``Cell.memory_plan``); ``None`` for a cell without a budget or a peer's cell (the cell records it
    unsupported)."""
    spec = cell.run_spec()
    if not spec.variant_obj.memory_budget or cell.peer is not None:
        return None
    exp = Experiment(spec)
    try:
        return plan_experiment(exp, warmup=warmup)[1]
    except ConfigError as exc:
        raise ConfigError(f"{cell.label()}: {exc}") from None


def plan_cells(cells: Sequence[Cell], *, warmup: bool = True, out: TextIO | None = None) -> list[Cell]:
    """Every budgeted cell planned before any runs, one line each on ``out`` (stdout), and the cells with their
    plan in ``memory_plan`` (the cell's process applies it without probing again); the first budget that
    nothing fits raises (exit 2, nothing written)."""
    planned = []
    for cell in cells:
        plan = plan_cell(cell, warmup=warmup)
        if plan is not None:
            print(plan.line(cell.label()), file=out or sys.stdout, flush=True)
            cell = replace(cell, memory_plan=plan.to_json())
        planned.append(cell)
    return planned
