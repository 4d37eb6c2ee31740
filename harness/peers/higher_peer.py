"""``higher`` (0.2.1) as a peer: ``innerloop_ctx`` with SGD, one parameter group per adapted tensor.

Second order as is; first order through ``grad_callback`` detaching the inner gradients; learnable LRs at any
granularity through ``override``; BatchNorm buffers copied back after each task.
"""
from __future__ import annotations

import importlib
from typing import Mapping

import torch
from torch import Tensor, nn

from harness.core.config import MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.peers.base import Peer, detach_all

__all__ = ["HigherPeer"]


class HigherPeer(Peer):
    """MAML with ``higher.innerloop_ctx``: SGD, one parameter group per adapted tensor."""

    name = "higher"

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__(learner, cfg)
        self._higher = importlib.import_module("higher")

    def _override(self, lrs: Mapping[str, Tensor] | None, k: int) -> dict[str, list] | None:
        if lrs is None:
            return None
        assert self.learner.lrs is not None
        return {"lr": [self.learner.lrs.lookup(lrs, n, k) for n in self.adapted]}

    def _task_loss(self, task: Task) -> Tensor:
        named = dict(self.model.named_parameters())
        opt = torch.optim.SGD([{"params": [named[n]]} for n in self.adapted], lr=self.cfg.inner_lr)
        lrs = self.lr_values()
        per_step = lrs is not None and self.learner.lrs is not None and self.learner.lrs.per_step
        callback = detach_all if self.cfg.first_order else None
        with self._higher.innerloop_ctx(self.model, opt, copy_initial_weights=False, track_higher_grads=True,
                                        override=self._override(lrs, 0)) as (fmodel, diffopt):
            for k in range(self.cfg.inner_steps):
                support = self._loss(fmodel, task.support_x, task.support_y)
                diffopt.step(support, override=self._override(lrs, k) if per_step else None,
                             grad_callback=callback)
            query = self._loss(fmodel, task.query_x, task.query_y)
            self._write_back_buffers(fmodel)
            return query

    def _write_back_buffers(self, fmodel: nn.Module) -> None:
        """higher runs on private copies of the buffers (``buffer_sync`` clones them on entry); copy the
        updated running statistics back so the model's state evolves exactly as under the engine."""
        theirs = dict(fmodel.named_buffers())
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in theirs and theirs[n] is not b:
                    b.copy_(theirs[n])
