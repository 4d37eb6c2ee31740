"""All K inner steps in one autograd Function that runs a step schedule (:mod:`harness.core.schedules`).

Its inputs are the weights and the LR values, as :func:`harness.core.segment.checkpoint_segment` takes them.
The forward runs the schedule's forward phase values-only on the model's real buffers (so they end updated
exactly as without checkpointing), keeping each ``Store``'s weights, a copy of the buffers' values and the RNG
states (global and the model's own generators); it ends at the pending state (the input of step K-1), keeps
it, and evaluates step K-1 values-only for the final weights.  The backward runs the backward phase inside
``torch.random.fork_rng``: every recomputation binds clones of stored buffer values, a ``Load`` replays the
snapshot's RNG states (dropout and module-owned generators draw the forward's numbers) and the streams are
left as the backward found them.  A ``Rebuild`` differentiates one step's graph; LR gradients are summed
over the steps, frozen parameters pass through non-differentiable.

Every step, values-only or rebuilt, is ``MetaLearner.inner_loop`` over one step -- the one place the update
rule lives -- so per-layer checkpointing, every LR granularity and per-step LRs, first and second order, fp16
loss scaling and data-parallel ranks compose as they do with segments.  Values-only steps are detached one by
one, so a long ``Advance`` holds one weight copy, not one per step.  Supports one backward (meta-gradients):
snapshots are released as the schedule consumes them.

:func:`traced` records what the executor ran (values-only steps, rebuilt steps, most snapshots held): the
tests compare it with the optimal counts.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from harness.core.config import Weights
from harness.core.recompute import owned_generators
from harness.core.schedules import Advance, Load, Schedule, Store, binomial, one_step_segments
from harness.core.segment import RngState, capture_rng, replay_rng, set_rng
from harness.core.state import recompute_scope

if TYPE_CHECKING:  # pragma: no cover
    from harness.core.engine import MetaLearner

__all__ = ["Trace", "checkpoint_schedule", "schedule_for", "traced"]


@dataclass
class Trace:
    """What the executor ran: values-only step evaluations, the rebuilt steps in order, most snapshots held."""

    values_only: int = 0
    rebuilt: list[int] = field(default_factory=list)
    peak_held: int = 0


_ACTIVE: list[Trace] = []


@contextlib.contextmanager
def traced() -> Iterator[Trace]:
    """Record every scheduled step checkpoint run inside the block."""
    trace = Trace()
    _ACTIVE.append(trace)
    try:
        yield trace
    finally:
        _ACTIVE.remove(trace)


def _note(values_only: int = 0, rebuilt: int | None = None, held: int = 0) -> None:
    for t in _ACTIVE:
        t.values_only += values_only
        t.rebuilt += [] if rebuilt is None else [rebuilt]
        t.peak_held = max(t.peak_held, held)


class _Point(NamedTuple):
    """One inner-loop state: the weights (detached), the buffers' values, the RNG states."""

    weights: tuple[Tensor, ...]
    buffers: dict[str, Tensor]
    rng: RngState


def _clones(buffers: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in buffers.items()}


def _add(total: Tensor | None, g: Tensor | None) -> Tensor | None:
    return g if total is None else total if g is None else total + g


@dataclass
class _Run:
    """One task's inner loop: the learner, the support set and the schedule; what forward hands backward."""

    learner: "MetaLearner"
    x: Tensor
    y: Tensor
    loss_scale: float
    names: list[str]
    lr_keys: list[str]
    schedule: Schedule
    generators: tuple[torch.Generator, ...]
    requires: tuple[bool, ...] = ()  # of the Function's inputs: weights, then LR values
    lrs: tuple[Tensor, ...] = ()  # the LR values, detached

    def leaves(self, weights: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Fresh leaves for one step: the weights and LRs, requiring grad as the Function's inputs do."""
        n = len(self.names)
        w = [t.detach().requires_grad_(rq) for t, rq in zip(weights, self.requires[:n])]
        return w, [t.detach().requires_grad_(rq) for t, rq in zip(self.lrs, self.requires[n:])]

    def step(self, w: Sequence[Tensor], lr: Sequence[Tensor], k: int, buffers: dict[str, Tensor] | None,
             build_graph: bool) -> tuple[Tensor, ...]:
        """Inner step ``k`` from ``w`` (``buffers``: bound in place of the model's, as a recomputation does)."""
        out = self.learner.inner_loop(dict(zip(self.names, w)), dict(zip(self.lr_keys, lr)) if self.lr_keys
                                        else None, self.x, self.y, range(k, k + 1), loss_scale=self.loss_scale,
                                        buffers=buffers, build_graph=build_graph)
        return tuple(out[n] for n in self.names)

    def advance(self, weights: tuple[Tensor, ...], n0: int, n1: int,
                buffers: dict[str, Tensor] | None) -> tuple[Tensor, ...]:
        """Steps ``n0..n1-1`` values-only, each detached before the next."""
        for k in range(n0, n1):
            weights = tuple(o.detach() for o in self.step(*self.leaves(weights), k, buffers, False))
            _note(values_only=1)
        return weights

    def point(self, weights: tuple[Tensor, ...], buffers: Mapping[str, Tensor]) -> _Point:
        """The state now: ``weights``, a copy of ``buffers``, the RNG states."""
        return _Point(weights, _clones(buffers), capture_rng(weights, self.generators))

    def rebuild(self, at: _Point, k: int, adjoint: list[Tensor | None],
                lr_grads: list[Tensor | None]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Step ``k`` with its full graph from ``at``; the adjoint of its input, LR gradients summed."""
        w, lr = self.leaves(at.weights)
        out = self.step(w, lr, k, at.buffers, True)
        pairs = [(o, g) for o, g in zip(out, adjoint) if o.requires_grad and g is not None]
        wanted = [a for a in (*w, *lr) if a.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        got = [next(grads) if a.requires_grad else None for a in (*w, *lr)]
        _note(rebuilt=k)
        return got[: len(w)], [_add(t, g) for t, g in zip(lr_grads, got[len(w):])]


class _Scheduled(torch.autograd.Function):
    """Forward phase values-only; backward phase recomputes and rebuilds as the schedule says."""

    @staticmethod
    def forward(ctx, run: _Run, *inputs: Tensor):  # noqa: ANN001, ANN205
        ctx.run, n = run, len(run.names)
        run.requires, run.lrs = tuple(x.requires_grad for x in inputs), tuple(x.detach() for x in inputs[n:])
        model = run.learner.model
        snapshots: dict[int, _Point] = {}
        weights = tuple(x.detach() for x in inputs[:n])
        with torch.enable_grad():
            for a in run.schedule.forward:
                if isinstance(a, Store):
                    snapshots[a.n] = run.point(weights, dict(model.named_buffers()))
                    _note(held=len(snapshots))
                else:  # the schedule's check allows Store and Advance only in the forward phase
                    weights = run.advance(weights, a.n0, a.n1, None)
            pending = run.point(weights, dict(model.named_buffers()))
            out = run.step(*run.leaves(weights), run.schedule.steps - 1, None, False)
            _note(values_only=1)
        ctx.state = (snapshots, pending)
        detached = tuple(o.detach() for o in out)
        ctx.mark_non_differentiable(*[d for d, o in zip(detached, out) if not o.requires_grad])
        return detached

    @staticmethod
    def backward(ctx, *grads_out: Tensor):  # noqa: ANN001, ANN205
        run = ctx.run
        if ctx.state is None:
            raise RuntimeError("a scheduled step checkpoint supports one backward (its snapshots are released "
                               "as the backward consumes them)")
        (snapshots, working), ctx.state = ctx.state, None
        adjoint, lr_grads = list(grads_out), [None] * len(run.lr_keys)
        with recompute_scope(), replay_rng(working.rng), torch.enable_grad():
            for a in run.schedule.backward:
                if isinstance(a, Load):
                    snap = snapshots.pop(a.n) if a.drop else snapshots[a.n]
                    working = snap if a.drop else snap._replace(buffers=_clones(snap.buffers))
                    set_rng(snap.rng)
                elif isinstance(a, Store):
                    snapshots[a.n] = run.point(working.weights, working.buffers)
                    _note(held=len(snapshots))
                elif isinstance(a, Advance):
                    working = working._replace(weights=run.advance(working.weights, a.n0, a.n1, working.buffers))
                else:
                    adjoint, lr_grads = run.rebuild(working, a.n, adjoint, lr_grads)
                    working = None
        return (None, *[g if rq else None for g, rq in zip(adjoint + lr_grads, run.requires)])


def schedule_for(steps: int, snapshots: int, step_ckpt: int) -> Schedule:
    """Binomial with ``snapshots`` stored states, else segments of ``step_ckpt`` rebuilt one step at a time."""
    return binomial(steps, snapshots) if snapshots else one_step_segments(steps, step_ckpt)


def checkpoint_schedule(learner: "MetaLearner", weights: Weights, lrs: Mapping[str, Tensor] | None, x: Tensor,
                        y: Tensor, loss_scale: float = 1.0) -> Weights:
    """``learner.cfg.inner_steps`` inner steps from ``weights`` under the configured schedule; fast weights."""
    cfg = learner.cfg
    names, lr_keys = list(weights), list(lrs) if lrs is not None else []
    run = _Run(learner, x, y, loss_scale, names, lr_keys, schedule_for(cfg.inner_steps, cfg.snapshots, cfg.step_ckpt),
               tuple(owned_generators(learner.model)))
    out = _Scheduled.apply(run, *[weights[n] for n in names], *[lrs[k] for k in lr_keys])
    return dict(zip(names, out))
