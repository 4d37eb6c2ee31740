"""``torch-maml`` (1.0, memory-efficient-maml) as a peer: the step-checkpointing anchor.

``NaiveMAML`` for plain second-order MAML and ``GradientCheckpointMAML(checkpoint_steps=n)`` for a cell whose
variant checkpoints segments of ``n`` inner steps (``sckpt``: n = 1; ``--set step_ckpt=n``), both with
``IngraphGradientDescent(inner_lr)`` and ``get_parameters`` returning the adapted tensors by name.  Each inner
step gets the support set as its input; the query loss is taken on ``result.model``, the updated copy.

``GradientCheckpointMAML`` calls ``torch.utils.checkpoint.checkpoint`` without ``use_reentrant``, i.e. reentrant
checkpoints (torch 2.14.1 warns; measured: it runs).  A reentrant checkpoint refuses ``torch.autograd.grad``
("When use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()"), so this adapter's
``meta_gradients`` goes through ``.backward()`` (per task, as a user of the library would), reads ``.grad``
of the shared parameters and restores whatever ``.grad`` they held before.  ``GradientCheckpointMAML`` also
freezes BatchNorm running statistics inside its checkpoints (``disable_batchnorm_stats``), so on a BatchNorm
model its meta-gradients equal ours but the running statistics after a step do not.

Run: ``python -m harness bench --preset sinusoid --variants torch_maml:sckpt,sckpt``
"""
from __future__ import annotations

import importlib
import warnings
from typing import Iterable

import torch
from torch import Tensor, nn

from harness.core.config import MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.peers.base import Peer

__all__ = ["TorchMamlPeer"]

REENTRANT_WARNING = "torch.utils.checkpoint: the use_reentrant parameter should be passed explicitly"


class TorchMamlPeer(Peer):
    """MAML with ``torch_maml.NaiveMAML`` / ``GradientCheckpointMAML``: second order, one fixed inner LR."""

    name = "torch_maml"

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__(learner, cfg)
        tm = importlib.import_module("torch_maml")
        adapted = set(self.adapted)

        def get_parameters(model: nn.Module) -> list[Tensor]:
            return [p for n, p in model.named_parameters() if n in adapted]

        def loss_function(model: nn.Module, inputs: tuple[Tensor, Tensor]) -> Tensor:
            return self._loss(model, *inputs)

        kw = dict(optimizer=tm.IngraphGradientDescent(cfg.inner_lr), get_parameters=get_parameters)
        self.checkpointed = cfg.step_ckpt > 0
        self.maml = (tm.GradientCheckpointMAML(self.model, loss_function, checkpoint_steps=cfg.step_ckpt, **kw)
                     if self.checkpointed else tm.NaiveMAML(self.model, loss_function, **kw))

    def _task_loss(self, task: Task) -> Tensor:
        inputs = [(task.support_x, task.support_y)] * self.cfg.inner_steps
        if not inputs:  # torch-maml asserts non-empty inputs; zero steps is the query loss itself
            return self._loss(self.model, task.query_x, task.query_y)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=REENTRANT_WARNING)
            result = self.maml(inputs)
        return self._loss(result.model, task.query_x, task.query_y)

    def meta_gradients(self, tasks: Iterable[Task], loss_scale: float = 1.0) -> tuple[dict[str, Tensor], float]:
        """Through ``.backward()`` when checkpointed (reentrant checkpoints refuse ``autograd.grad``)."""
        if not self.checkpointed:
            return super().meta_gradients(tasks, loss_scale)
        tasks = list(tasks)
        params = self.meta_parameters()
        saved = {k: p.grad for k, p in params.items()}
        losses: list[float] = []
        try:
            for p in params.values():
                p.grad = None
            for task in tasks:
                loss = self.task_loss(task, loss_scale)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=REENTRANT_WARNING)
                    (loss / len(tasks)).backward()
                losses.append(loss.detach().item())
            grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
        finally:
            for k, p in params.items():
                p.grad = saved[k]
        return grads, sum(losses) / len(losses)
