"""``torchopt`` (0.7.3) as a peer: the functional API, ``torchopt.sgd`` and ``apply_updates`` on fast weights.

Fixed inner LR only (one scalar per transformation); first order through ``impl.update`` on inner gradients
taken without a graph.
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from harness.core.config import MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.peers.base import Peer

__all__ = ["TorchoptPeer"]


class TorchoptPeer(Peer):
    """MAML with torchopt's functional API: ``torchopt.sgd`` + ``apply_updates`` on a dict of fast weights."""

    name = "torchopt"

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__(learner, cfg)
        self._torchopt = importlib.import_module("torchopt")

    def _task_loss(self, task: Task) -> Tensor:
        to = self._torchopt
        weights: dict[str, Tensor] = dict(self.model.named_parameters())
        fast = tuple(weights[n] for n in self.adapted)
        if self.cfg.first_order:
            impl = to.sgd(lr=self.cfg.inner_lr)
            state = impl.init(fast)
        else:
            inner = to.FuncOptimizer(to.sgd(lr=self.cfg.inner_lr), inplace=False)
        for _ in range(self.cfg.inner_steps):
            support = self._loss(self._bind(weights, fast), task.support_x, task.support_y)
            if self.cfg.first_order:
                grads = torch.autograd.grad(support, fast, create_graph=False, allow_unused=True)
                updates, state = impl.update(grads, state, params=fast, inplace=False)
                fast = tuple(to.apply_updates(fast, updates, inplace=False))
            else:
                fast = tuple(inner.step(support, fast))
        return self._loss(self._bind(weights, fast), task.query_x, task.query_y)

    def _bind(self, weights: Mapping[str, Tensor], fast: tuple[Tensor, ...]) -> Callable[[Tensor], Tensor]:
        bound = {**weights, **dict(zip(self.adapted, fast))}
        return lambda x: functional_call(self.model, bound, (x,), strict=False)
