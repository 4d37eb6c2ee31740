"""Is the variant's meta-gradient the non-checkpointed one?  The check every run and cell does first.

:func:`check_agreement` computes the learner's meta-gradients and those of its reference (``cfg.reference()``:
no checkpointing, every checkpoint of the model a plain call) on the same weights, tasks, buffers and random
states, and returns the relative errors and cosines (:func:`harness.core.grads.agreement`).
:func:`check_meta_gradients` adds, for an approximate estimator (first order, truncated, implicit, reptile), its
fidelity: the same figures against the exact meta-gradient (``cfg.exact()``), and implicit's CG residual.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from harness.core.config import Task
from harness.core.engine import MetaLearner
from harness.core.grads import agreement
from harness.core.recompute import owned_generators
from harness.core.segment import capture_rng, replay_rng
from harness.loop.spec import Experiment

__all__ = ["MetaGradientCheck", "check_agreement", "check_meta_gradients", "unscaled_meta_gradients"]


def unscaled_meta_gradients(learner: MetaLearner, tasks: list[Task], scale: float | None = None) -> dict[str, torch.Tensor]:
    """Meta-gradients of the unscaled loss; fp16 takes them on the loss times ``scale`` (default GradScaler's
    initial 2**16), then divides; other precisions ignore ``scale``."""
    scale = (2.0 ** 16 if scale is None else scale) if learner.cfg.amp == "fp16" else 1.0
    grads, _ = learner.meta_gradients(tasks, loss_scale=scale)
    return {k: g / scale for k, g in grads.items()} if scale != 1.0 else grads


class MetaGradientCheck(NamedTuple):
    """The agreement with the non-checkpointed reference; the fidelity to the exact estimator (None: exact)."""

    agreement: dict[str, float | None]
    fidelity: dict[str, float | None] | None


def check_agreement(exp: Experiment, tasks: list[Task], learner: Any = None) -> dict[str, float | None]:
    """Meta-gradients of ``learner`` (default ``exp.learner``; a peer works too) vs the non-checkpointed
    reference of ``exp``, on the same weights and tasks (:func:`check_meta_gradients` without the fidelity)."""
    return check_meta_gradients(exp, tasks, learner, fidelity=False).agreement


def check_meta_gradients(exp: Experiment, tasks: list[Task], learner: Any = None, fidelity: bool = True
                         ) -> MetaGradientCheck:
    """Meta-gradients of ``learner`` (default ``exp.learner``; a peer works too) vs the non-checkpointed
    reference of ``exp``, on the same weights and tasks; with ``fidelity`` and an approximate estimator, also vs
    the exact meta-gradient (same model, tasks, weights and LRs) and, for implicit, ``cg_residual``.

    Every computation starts from the same buffers and random state (the global generators and the model's
    own), so running statistics, dropout and a layer's own noise are the same in each, and the cell's state
    is left as found.  Under mixed
    precision the learner is also compared with the fp32 non-checkpointed reference (keys prefixed ``fp32_``).
    """
    learner = exp.learner if learner is None else learner
    buffers = {n: b.clone() for n, b in exp.learner.named_buffers()}
    start = capture_rng(list(exp.learner.parameters()), owned_generators(exp.learner.model))

    def from_start(run: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # the running statistics as found, for every computation and at the end
            for n, b in exp.learner.named_buffers():
                b.copy_(buffers[n])
        with replay_rng(start):
            return unscaled_meta_gradients(run, tasks)

    refs = {"": exp.reference_learner()}
    if exp.learner.cfg.amp != "off":
        refs["fp32_"] = exp.reference_learner(amp="off")
    grads = from_start(learner)
    residual = getattr(learner, "last_cg_residual", None)
    out: dict[str, float | None] = {}
    for prefix, ref in refs.items():
        out.update({prefix + k: v for k, v in agreement(grads, from_start(ref)).items()})
    to_exact = None
    if fidelity and exp.learner.cfg.estimator != "exact":
        to_exact = agreement(grads, from_start(exp.reference_learner(exact=True)))
        if exp.learner.cfg.estimator == "implicit":
            to_exact["cg_residual"] = residual
    with torch.no_grad():
        for n, b in exp.learner.named_buffers():
            b.copy_(buffers[n])
    return MetaGradientCheck(out, to_exact)
