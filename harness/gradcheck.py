"""Finite differences of the meta-loss against the meta-gradient: the check that does not trust the engine.

Why: the agreement check (:func:`harness.loop.agreement.check_agreement`) compares a variant with the non-checkpointed
reference, which runs the same engine; a mistake the two share (a wrong second-order term, say) agrees with
itself.  Central differences of the mean query loss along random directions of the meta-parameters (initial
weights and learnable LRs) need only the forward.  ``python -m harness check`` records the error of every
second-order cell as ``fd_rel_err`` (float64, ``h = 1e-5``).

Step ``h = 1e-5`` in float64: the truncation error is ``h^2 |L'''| / 6 ~ 1e-11`` and the rounding error
``eps |L| / h ~ 1e-11`` for O(1) losses, far below ``check``'s 1e-6 bound.  Buffers are restored and the
global generator reseeded before every evaluation, so each one sees the running statistics and dropout masks
of the gradient's own forward; the learner's parameters, buffers and the global RNG (the CPU's and the GPUs' the
parameters live on) are left as found.  The directions are drawn on the CPU and moved to each parameter's device
(the H200 session found them left on the CPU: every second-order ``check`` cell on CUDA failed).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from harness.core.config import Task

__all__ = ["FD_SEED", "FD_STEP", "finite_difference_error"]

FD_STEP = 1e-5
FD_SEED = 1234


def finite_difference_error(learner: Any, tasks: list[Task], *, directions: int = 2, h: float = FD_STEP,
                            seed: int = FD_SEED) -> float:
    """``|fd - g.v| / |g.v|`` over ``directions`` random directions ``v`` (one vector of all of them), where
    ``fd`` is the central difference of the mean query loss (``learner.task_loss``) along ``v`` and ``g`` the
    learner's meta-gradient (``learner.meta_gradients``) on the same tasks."""
    params = learner.meta_parameters()
    buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
    origin = {k: p.detach().clone() for k, p in params.items()}

    # the global generators this function reseeds: the CPU's and those of the GPUs the parameters live on
    gpus = sorted({p.device.index for p in params.values() if p.device.type == "cuda"})

    def reset(offset: Mapping[str, Tensor] | None = None, scale: float = 0.0) -> None:
        with torch.no_grad():
            for n, b in learner.model.named_buffers():
                b.copy_(buffers[n])
            for k, p in params.items():
                p.copy_(origin[k] if offset is None else origin[k] + scale * offset[k])
        torch.default_generator.manual_seed(seed)  # only the generators fork_rng restores (not every GPU's)
        for i in gpus:
            torch.cuda.default_generators[i].manual_seed(seed)

    def meta_loss() -> float:
        return sum(learner.task_loss(t).item() for t in tasks) / len(tasks)

    with torch.random.fork_rng(devices=gpus):
        try:
            reset()
            grads, _ = learner.meta_gradients(tasks)
            gen = torch.Generator().manual_seed(seed + 1)
            fd, gv = [], []
            for _ in range(directions):
                v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
                     for k, p in params.items()}  # drawn on the CPU: the same directions on every device
                reset(v, h)
                plus = meta_loss()
                reset(v, -h)
                minus = meta_loss()
                fd.append((plus - minus) / (2 * h))
                gv.append(sum((grads[k] * v[k]).sum().item() for k in params))
        finally:
            reset()
    diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(fd, gv)))
    norm = math.sqrt(sum(b * b for b in gv))
    return diff / norm if norm > 0 else diff
