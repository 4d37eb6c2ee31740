"""The original report's model, as the report writes it: an ``nn.ModuleList`` whose forward calls
``torch.utils.checkpoint.checkpoint(m, x)`` on every module itself (torch's default, a reentrant
checkpoint).  Two changes only, both needed to run it at all: the report's ``torch.util.checkpoint`` is
``torch.utils.checkpoint.checkpoint``, and its attribute ``self.modules`` is named ``self.layers`` here
(``self.modules`` is ``nn.Module.modules``, so the report's loop would iterate a method).  The modules are
the seed preset's pre-norm residual blocks (``harness.zoo.models.ResBlock``), smaller by default so that the
whole matrix runs on a CPU in minutes.

Every combination of the three axes on this model, with its memory and time, each variant's meta-gradients
checked against a non-checkpointed reference in float64 and finite differences::

    python -m harness check --model docs/seed_model.py:SeedModel --preset cpu-bench

(docs/own-model.md shows the committed run).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from harness.zoo.models import ResBlock

__all__ = ["SeedModel"]


class SeedModel(nn.Module):
    def __init__(self, in_dim: int = 16, width: int = 64, depth: int = 4, out_dim: int = 16):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(in_dim, width), *(ResBlock(width) for _ in range(depth)),
                                     nn.LayerNorm(width), nn.Linear(width, out_dim)])

    def forward(self, x):
        for m in self.layers:
            x = torch.utils.checkpoint.checkpoint(m, x)
        return x
