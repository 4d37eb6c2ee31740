"""Presets bundle a task, a model and sizes; read top to bottom.

``python -m harness list`` prints them.  Add one by appending to ``PRESETS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from harness.core.config import ConfigError
from harness.zoo.models import MLP, Conv4, ResMLP
from harness.zoo.tasks import SequenceRegression, Sinusoid, SyntheticImages
from harness.zoo.omniglot import Omniglot
from harness.zoo.digits import Digits, digits_mlp
from harness.zoo.resnet import ResNet18

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "get_preset"]

DEFAULT_PRESET = {"cuda": "seed", "cpu": "cpu-bench"}  # bench's preset when --preset is not given


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    make_task: Callable[..., Any]
    make_model: Callable[..., nn.Module]
    meta_batch: int
    inner_steps: int
    inner_lr: float
    outer_lr: float = 1e-3
    meta_steps: int = 10  # default for `run`
    adapt_last: int | None = None
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def task(self, **overrides: Any) -> Any:
        return self.make_task(**{**self.task_kwargs, **overrides})

    def model(self, **overrides: Any) -> nn.Module:
        return self.make_model(**{**self.model_kwargs, **overrides})


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("quick", "sinusoid, 40-40 MLP, 2 inner steps: CPU, seconds",
           Sinusoid, MLP, meta_batch=4, inner_steps=2, inner_lr=0.01, meta_steps=20),
    Preset("sinusoid", "MAML paper sinusoid regression (10 shots), 40-40 MLP, 1 inner step",
           Sinusoid, MLP, meta_batch=25, inner_steps=1, inner_lr=0.01, meta_steps=1000),
    Preset("conv4", "synthetic Omniglot-shaped 5-way 1-shot, MAML conv4 with BatchNorm",
           SyntheticImages, Conv4, meta_batch=4, inner_steps=1, inner_lr=0.4,
           task_kwargs=dict(n_way=5, k_shot=1), model_kwargs=dict(n_way=5)),
    Preset("cpu-bench", "4 pre-norm residual blocks, width 64, 4x32 tokens: the CPU matrix",
           SequenceRegression, ResMLP, meta_batch=2, inner_steps=2, inner_lr=0.05, meta_steps=3,
           task_kwargs=dict(sequences=4, tokens=32), model_kwargs=dict(width=64, depth=4)),
    Preset("seed", "the seed's model: 12 pre-norm residual blocks, width 768, 16x256 tokens per task (one GPU)",
           SequenceRegression, ResMLP, meta_batch=1, inner_steps=3, inner_lr=0.01, meta_steps=5,
           task_kwargs=dict(sequences=16, tokens=256), model_kwargs=dict(width=768, depth=12)),
    Preset("resnet18", "synthetic 5-way 1-shot 3x84x84 images, torchvision ResNet-18 checkpointed per residual stage",
           SyntheticImages, ResNet18, meta_batch=2, inner_steps=1, inner_lr=0.01, meta_steps=10,
           task_kwargs=dict(n_way=5, k_shot=1, channels=3, size=84), model_kwargs=dict(n_way=5)),
    Preset("omniglot", "real Omniglot 5-way 1-shot (needs --data-root), MAML conv4 with BatchNorm",
           Omniglot, Conv4, meta_batch=32, inner_steps=1, inner_lr=0.4, meta_steps=1000,
           task_kwargs=dict(n_way=5, k_shot=1), model_kwargs=dict(n_way=5)),
    Preset("digits", "real 8x8 digits bundled with scikit-learn, 3-way 1-shot, held-out digits; 64-64 MLP",
           Digits, digits_mlp, meta_batch=8, inner_steps=1, inner_lr=0.5, meta_steps=300,
           task_kwargs=dict(n_way=3, k_shot=1), model_kwargs=dict(n_way=3)),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
