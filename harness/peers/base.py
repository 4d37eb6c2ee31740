"""What every peer adapter shares: the meta-parameters are the reference learner's own tensors, the loss runs
under the cell's autocast, and the models' ``harness.checkpoint`` calls are plain calls.

See ``harness/peers/__init__.py`` for what each peer expresses.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from harness.core.ckpt import layer_checkpointing
from harness.core.config import AMP_MODES, ConfigError, MetaConfig, Task
from harness.core.engine import MetaLearner, OuterLoop
from harness.peers.support import NO_FP16

__all__ = ["Peer", "detach_all"]


class Peer(OuterLoop, nn.Module):
    """Shared plumbing: the meta-parameters are those of the reference learner (shared, not copied)."""

    name = ""

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__()
        self.learner = learner  # registered submodule: parameters() are the learner's own tensors
        self.cfg = cfg
        self.model, self.loss_fn, self.adapted = learner.model, learner.loss_fn, learner.adapted

    def meta_parameters(self) -> dict[str, Tensor]:
        return self.learner.meta_parameters()

    def lr_values(self) -> dict[str, Tensor] | None:
        return self.learner.lrs.values() if (self.cfg.learn_lr and self.learner.lrs is not None) else None

    def _task_loss(self, task: Task) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss(self, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Forward and loss under the cell's autocast (bf16), as a user of the peer would wrap them."""
        amp_dtype = AMP_MODES[self.cfg.amp]
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return self.loss_fn(forward(x), y)

    def task_loss(self, task: Task, loss_scale: float = 1.0) -> Tensor:
        if loss_scale != 1.0:
            raise ConfigError(f"{self.name}: {NO_FP16}")
        with layer_checkpointing(False):  # harness.checkpoint in the models: plain calls for peers
            return self._task_loss(task)


def detach_all(grads: Iterable[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]
