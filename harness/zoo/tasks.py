"""Task samplers: every meta-batch is drawn from an explicit ``torch.Generator``,
so the same seed gives the same tasks on any device.  Nothing is downloaded.

* :class:`Sinusoid` -- MAML paper: amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5].
* :class:`SyntheticImages` -- N-way K-shot classification of noisy random class prototypes
  (Omniglot-shaped by default: 1 x 28 x 28).
* :class:`SequenceRegression` -- per-task random linear-tanh map applied per token, for the ResMLP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.core.config import ConfigError, Task

__all__ = ["SequenceRegression", "Sinusoid", "SyntheticImages", "cross_entropy", "mse", "nway_kshot_episodes"]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred, target)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


@dataclass(frozen=True)
class Sinusoid:
    shots: int = 10
    query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    loss_fn = staticmethod(mse)

    def __post_init__(self) -> None:
        if self.shots < 1 or self.query < 1:
            raise ConfigError(f"shots and query must be >= 1; got {self.shots}, {self.query}")

    def sample(self, n_tasks: int, gen: torch.Generator) -> list[Task]:
        def u(lo: float, hi: float, *shape: int) -> Tensor:
            return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

        tasks = []
        for _ in range(n_tasks):
            a, p = u(*self.amplitude, 1), u(*self.phase, 1)
            x = u(*self.x_range, self.shots + self.query, 1)
            y = a * torch.sin(x - p)
            tasks.append(Task(x[: self.shots].float(), y[: self.shots].float(),
                              x[self.shots:].float(), y[self.shots:].float()))
        return tasks


@dataclass(frozen=True)
class SyntheticImages:
    """N-way K-shot episodes over a fixed pool of ``num_classes`` random class prototypes."""

    n_way: int = 5
    k_shot: int = 1
    query: int = 5  # per class
    num_classes: int = 1200
    channels: int = 1
    size: int = 28
    noise: float = 0.5
    pool_seed: int = 0
    loss_fn = staticmethod(cross_entropy)

    def __post_init__(self) -> None:
        if self.n_way < 1 or self.k_shot < 1 or self.query < 1:
            raise ConfigError(f"n_way, k_shot and query must be >= 1; got {self.n_way}, {self.k_shot}, {self.query}")
        if self.n_way > self.num_classes:
            raise ConfigError(f"n_way={self.n_way} is more ways than the {self.num_classes} classes available")

    def _prototype(self, c: int) -> Tensor:
        g = torch.Generator().manual_seed(self.pool_seed * 1_000_003 + c)
        return torch.randn(self.channels, self.size, self.size, generator=g)

    def sample(self, n_tasks: int, gen: torch.Generator) -> list[Task]:
        tasks = []
        for _ in range(n_tasks):
            classes = torch.randperm(self.num_classes, generator=gen)[: self.n_way].tolist()
            protos = torch.stack([self._prototype(c) for c in classes])

            def draw(per_class: int) -> tuple[Tensor, Tensor]:
                y = torch.arange(self.n_way).repeat_interleave(per_class)
                x = protos[y] + self.noise * torch.randn(len(y), self.channels, self.size, self.size, generator=gen)
                return x, y

            tasks.append(Task(*draw(self.k_shot), *draw(self.query)))
        return tasks


@dataclass(frozen=True)
class SequenceRegression:
    in_dim: int = 16
    out_dim: int = 16
    sequences: int = 16
    tokens: int = 256
    loss_fn = staticmethod(mse)

    def __post_init__(self) -> None:
        if min(self.in_dim, self.out_dim, self.sequences, self.tokens) < 1:
            raise ConfigError("in_dim, out_dim, sequences and tokens must be >= 1")

    def sample(self, n_tasks: int, gen: torch.Generator) -> list[Task]:
        tasks = []
        for _ in range(n_tasks):
            a = torch.randn(self.in_dim, self.out_dim, generator=gen) / math.sqrt(self.in_dim)

            def draw() -> tuple[Tensor, Tensor]:
                x = torch.randn(self.sequences, self.tokens, self.in_dim, generator=gen)
                return x, torch.tanh(x @ a)

            tasks.append(Task(*draw(), *draw()))
        return tasks


def nway_kshot_episodes(n_tasks: int, n_classes: int, images_of: Callable[[int], Tensor], n_way: int, k_shot: int,
                        query: int, gen: torch.Generator) -> list[Task]:
    """N-way K-shot episodes over classes ``0..n_classes-1`` (the image presets' one sampler): per task, draw
    ``n_way`` classes, then ``k_shot + query`` images of each; labels are the class's position in the draw."""
    tasks = []
    for _ in range(n_tasks):
        picked = torch.randperm(n_classes, generator=gen)[:n_way].tolist()
        sx, qx = [], []
        for cls in picked:
            imgs = images_of(cls)
            idx = torch.randperm(len(imgs), generator=gen)[: k_shot + query]
            sx.append(imgs[idx[:k_shot]])
            qx.append(imgs[idx[k_shot:]])
        ys = torch.arange(n_way).repeat_interleave(k_shot)
        yq = torch.arange(n_way).repeat_interleave(query)
        tasks.append(Task(torch.cat(sx), ys, torch.cat(qx), yq))
    return tasks
