"""The shipped models.  Each checkpoints its layers with :func:`harness.checkpoint`,
exactly where the seed's model called ``torch.utils.checkpoint(m, x)``; the
engine decides per variant whether that call checkpoints.

* :class:`MLP` -- the MAML paper's sinusoid regressor (1-40-40-1, ReLU).
* :class:`Conv4` -- the MAML paper's image network: 4 x [3x3 conv, 64 ch, norm, ReLU, 2x2 pool] + linear.
* :class:`ResMLP` -- a stack of pre-norm residual MLP blocks (LayerNorm, 4x hidden), like the seed's model.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.ckpt import checkpoint
from harness.core.config import ConfigError

__all__ = ["NORMS", "Conv4", "MLP", "ResBlock", "ResMLP"]

NORMS = ("batch", "group", "none")


class MLP(nn.Module):
    def __init__(self, in_dim: int = 1, hidden: tuple[int, ...] = (40, 40), out_dim: int = 1) -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], out_dim)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = checkpoint(layer, x)
        return self.head(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":  # running statistics tracked: exercises the buffer rule under recomputation
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm must be one of {', '.join(NORMS)}; got {kind!r}")


class Conv4(nn.Module):
    def __init__(self, n_way: int = 5, in_channels: int = 1, channels: int = 64, image_size: int = 28,
                 norm: str = "batch") -> None:
        super().__init__()
        blocks, c, size = [], in_channels, image_size
        for _ in range(4):
            blocks.append(nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), _norm(norm, channels),
                                        nn.ReLU(), nn.MaxPool2d(2)))
            c, size = channels, size // 2
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(channels * max(size, 1) ** 2, n_way)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = checkpoint(block, x)
        return self.head(x.flatten(1))


class ResBlock(nn.Module):
    """Pre-norm residual MLP block: ``x + W2 gelu(W1 LN(x))``."""

    def __init__(self, width: int, mult: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, mult * width)
        self.down = nn.Linear(mult * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ResMLP(nn.Module):
    def __init__(self, in_dim: int = 16, width: int = 768, depth: int = 12, out_dim: int = 16, mult: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width, mult) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = checkpoint(block, x)
        return self.head(self.norm(x))
