"""One ablation cell: meta-train a (variant, seed) through :func:`harness.loop.train.train` and evaluate it.

Seed ``s`` fixes the initial weights and the training task stream (identical for every variant); the
held-out tasks come from ``Generator(HELDOUT_SEED + s)`` over the sampler's held-out split (fresh
classes for synthetic images, held-out characters for Omniglot, held-out digits for digits).  The
meta-test curve is taken by an ``on_step`` callback of the one training loop, so the ablation trains
exactly as ``python -m harness run`` does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from harness.core.config import Task
from harness.core.engine import MetaLearner
from harness.reporting.schema import AblationCell
from harness.studies.ablation.spec import AblationSpec
from harness.loop.spec import Experiment, RunSpec
from harness.loop.train import Diverged, train
from harness.variants import Variant
from harness.zoo.tasks import SyntheticImages

__all__ = ["HELDOUT_SEED", "Evaluation", "evaluate", "heldout_sampler", "run_cell"]

HELDOUT_SEED = 1_000_003  # held-out tasks of seed s come from Generator(HELDOUT_SEED + s)


@dataclass(frozen=True)
class Evaluation:
    """Per-task meta-test query loss (and accuracy for classification) on the held-out tasks."""

    losses: list[float]
    accs: list[float] | None

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def mean_acc(self) -> float | None:
        return None if self.accs is None else sum(self.accs) / len(self.accs)


def heldout_sampler(task: Any) -> Any:
    """Held-out task family: the sampler's own (``heldout()``), fresh classes for synthetic images, else itself."""
    if hasattr(task, "heldout"):
        return task.heldout()
    if isinstance(task, SyntheticImages):
        return replace(task, pool_seed=task.pool_seed + 7919)
    return task


def evaluate(learner: MetaLearner, tasks: list[Task]) -> Evaluation:
    """Per-task query loss and accuracy after the variant's own inner loop.

    Buffers are restored afterwards, so evaluating never changes the training trajectory.
    """
    buffers = {n: b.clone() for n, b in learner.named_buffers()}
    losses: list[float] = []
    accs: list[float] | None = None if tasks[0].query_y.is_floating_point() else []
    for task in tasks:
        fast = {k: v.detach() for k, v in learner.adapt(task.support_x, task.support_y).items()}
        with torch.no_grad():
            out = learner.forward_with(fast, task.query_x)
            losses.append(learner.loss_fn(out, task.query_y).item())
            if accs is not None:
                accs.append((out.argmax(-1) == task.query_y).double().mean().item())
    with torch.no_grad():
        for n, b in learner.named_buffers():
            b.copy_(buffers[n])
    return Evaluation(losses, accs)


def run_cell(spec: AblationSpec, variant: Variant, seed: int,
             on_step: Callable[[], None] | None = None) -> AblationCell:
    """Meta-train one (variant, seed) with :func:`harness.loop.train.train` and evaluate on the held-out tasks."""
    run_spec = RunSpec(variant=spec.variants[0], preset=spec.preset, device=spec.device, dtype=spec.dtype,
                       inner_steps=spec.inner_steps, meta_batch=spec.meta_batch, meta_steps=spec.meta_steps, seed=seed,
                       **spec.user().fields())
    exp = Experiment(run_spec, variant=variant, task_overrides=spec.task_overrides,
                     model_overrides=spec.model_overrides)
    gen = torch.Generator().manual_seed(HELDOUT_SEED + seed)
    eval_tasks = [t.to(exp.device, run_spec.torch_dtype) for t in heldout_sampler(exp.task).sample(spec.eval_tasks, gen)]
    train_loss: list[float] = []
    curve: list[tuple[int, Evaluation]] = []

    def after_step(step: int, loss: float) -> None:  # step counts from 0; called only for finite losses
        train_loss.append(loss)
        if on_step is not None:
            on_step()
        done = step + 1
        if done % spec.eval_every == 0 and done != spec.meta_steps:
            curve.append((done, evaluate(exp.learner, eval_tasks)))

    status, message = "ok", None
    start, cpu_start = time.perf_counter(), time.process_time()
    curve.append((0, evaluate(exp.learner, eval_tasks)))
    try:
        train(exp, spec.meta_steps, on_step=after_step)
    except Diverged as exc:
        status, message = "diverged", str(exc)
    final = evaluate(exp.learner, eval_tasks) if status == "ok" else None
    if final is not None:
        curve.append((len(train_loss), final))
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    learner = exp.learner
    lrs = {k: v.detach().double().mean().item() for k, v in learner.lrs.values().items()} if learner.lrs else None
    acc_curve = [e.mean_acc for _, e in curve] if curve[0][1].accs is not None and final is not None else None
    return AblationCell(status=status, message=message, variant={"name": variant.name, **variant.flags}, seed=seed,
                        spec=spec.fingerprint(), sizes=exp.sizes, train_loss=train_loss,
                        curve_steps=[s for s, _ in curve], curve_test_loss=[e.mean_loss for _, e in curve],
                        curve_test_acc=acc_curve, test_loss=final.losses if final else [],
                        test_acc=final.accs if final else None, learned_lrs=lrs, wall_s=wall_s, cpu_s=cpu_s)
