"""The one training loop: a meta-step of any learner (the engine or a peer), the outer optimiser, the fp16
GradScaler and the divergence check, used by ``run`` (:func:`train`) and by every bench cell
(:class:`StepRunner`).

One meta-step: sample a meta-batch of tasks, K inner steps on each support set, query loss, one outer
optimiser step over the initial weights and the learnable LRs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from harness.core.config import Task
from harness.loop import distributed
from harness.loop.spec import Experiment

__all__ = ["MAX_CONSECUTIVE_SKIPS", "Diverged", "DivergenceCheck", "StepRunner", "TrainLog", "meta_step", "train"]


class Diverged(RuntimeError):
    """The meta-loss became NaN or infinite."""


@dataclass
class TrainLog:
    losses: list[float]
    skipped_steps: int = 0  # fp16: meta-steps skipped by the GradScaler (inf/NaN gradients)


MAX_CONSECUTIVE_SKIPS = 50


def meta_step(learner: Any, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
              tasks: list[Task]) -> tuple[float, bool]:
    """One outer step of any learner with ``step(tasks, loss_scale)``; returns (mean query loss, skipped).

    With an fp16 GradScaler the step may be skipped (inf/NaN gradients), exactly as ``scaler.step`` does.
    Under torchrun (:func:`harness.loop.distributed.session`) this rank takes its share of ``tasks`` and the
    meta-gradients and loss are the task-weighted means over all ranks, as one process would compute.
    """
    group = distributed.current()
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss = float(learner.step(tasks)) if group is None else group.step(learner, tasks)[0]
        opt.step()
        return loss, False
    device = next(iter(learner.parameters())).device
    scale = scaler.scale(torch.ones((), device=device)).item()  # also initialises the scaler's state
    if group is None:
        loss = float(learner.step(tasks, loss_scale=scale))
        finite = all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.grad is not None)
    else:
        loss, nonfinite = group.step(learner, tasks, scale)  # every rank agrees on skipping
        finite = not nonfinite
    scaler.step(opt)  # unscales, and skips the update when any gradient is inf/NaN
    scaler.update()
    return loss, not finite


@dataclass
class DivergenceCheck:
    """NaN/inf meta-loss stops a run; under a GradScaler only a long run of skipped steps does."""

    uses_scaler: bool
    skipped_steps: int = 0
    consecutive: int = 0

    def __call__(self, step: int, loss: float, skipped: bool) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.skipped_steps += skipped
        if (not self.uses_scaler and not math.isfinite(loss)) or self.consecutive > MAX_CONSECUTIVE_SKIPS:
            raise Diverged(f"meta-loss became {loss} at meta-step {step}")


def train(exp: Experiment, meta_steps: int, on_step: Callable[[int, float], None] | None = None) -> TrainLog:
    """Meta-train with Adam over the initial weights and LRs; returns the query loss per step."""
    group = distributed.current()
    if group is not None:  # every rank starts from rank 0's initial weights and LRs
        group.broadcast_module(exp.learner)
    opt = torch.optim.Adam(exp.learner.parameters(), lr=exp.sizes["outer_lr"])
    scaler = exp.new_scaler()
    check, log = DivergenceCheck(scaler is not None), TrainLog([])
    for step in range(meta_steps):
        loss, skipped = meta_step(exp.learner, opt, scaler, exp.sample())
        check(step, loss, skipped)
        log.skipped_steps = check.skipped_steps
        log.losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return log


@dataclass
class StepRunner:
    """One meta-step of any learner with ``step(tasks)`` and ``parameters()`` (MetaLearner or a peer)."""

    learner: Any
    outer_lr: float
    sample: Callable[[], list[Task]]
    scaler: Any = None  # torch.amp.GradScaler for fp16 autocast (as loop.meta_step)
    check_finite: bool = True  # raise Diverged on a NaN/inf meta-loss
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.opt = torch.optim.Adam(self.learner.parameters(), lr=self.outer_lr)
        self.divergence = DivergenceCheck(self.scaler is not None)

    def __call__(self, tasks: list[Task]) -> float:
        loss, skipped = meta_step(self.learner, self.opt, self.scaler, tasks)
        if self.check_finite:
            self.divergence(len(self.losses), loss, skipped)
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss)
        return loss
