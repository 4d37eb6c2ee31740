"""A user's own code for ``--model`` / ``--tasks`` (issue 21), as the tests and the README's bad-input list use it.

``make_stack`` is written as the seed report writes its model: an ``nn.ModuleList`` of small layers whose
forward calls ``torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)`` itself, with no
``harness`` import.  ``regression`` samples float64 regression tasks that fit it.  The rest is broken on
purpose, one way each, for the bad-input cases::

    python -m harness check --model tests/user_models.py:make_stack --tasks tests/user_models.py:regression
    python -m harness run --variant maml --model tests.user_models:not_a_module     # exit 2, one line
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from harness import Task

__all__ = ["Stack", "classification", "empty_sampler", "l1_regression", "make_stack", "not_a_module", "one_too_many", "raising_factory",
           "raising_sampler", "regression", "tuple_sampler", "wide_sampler", "wrong_items_sampler"]

IN_DIM = 3


class Stack(nn.Module):
    """Layers in a ModuleList, each checkpointed with torch's own checkpoint in the forward."""

    def __init__(self, width: int = 6, depth: int = 2, in_dim: int = IN_DIM, out_dim: int = 1) -> None:
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        return self.head(x)


def make_stack(width: int = 6, depth: int = 2) -> nn.Module:
    """The factory: ``--set model.width=8`` reaches ``width``."""
    return Stack(width=width, depth=depth)


def regression(n: int, gen: torch.Generator) -> list[Task]:
    """n tasks y = tanh(x @ a) + b, float64, 5 support and 5 query points each (MSE: float targets)."""
    tasks = []
    for _ in range(n):
        a = torch.randn(IN_DIM, 1, generator=gen, dtype=torch.float64)
        b = torch.randn(1, generator=gen, dtype=torch.float64)
        x = torch.randn(10, IN_DIM, generator=gen, dtype=torch.float64)
        y = torch.tanh(x @ a) + b
        tasks.append(Task(x[:5], y[:5], x[5:], y[5:]))
    return tasks


def classification(n: int, gen: torch.Generator) -> list[Task]:
    """n 1-output 'classification' tasks with integer targets (cross-entropy by the default rule)."""
    tasks = []
    for _ in range(n):
        x = torch.randn(8, IN_DIM, generator=gen, dtype=torch.float64)
        y = torch.zeros(8, dtype=torch.long)
        tasks.append(Task(x[:4], y[:4], x[4:], y[4:]))
    return tasks


def l1_regression(n: int, gen: torch.Generator) -> list[Task]:
    """As :func:`regression`, with its own loss (a ``loss_fn`` attribute wins over the default rule)."""
    return regression(n, gen)


l1_regression.loss_fn = nn.functional.l1_loss  # type: ignore[attr-defined]


# -- broken on purpose -------------------------------------------------------------------------------------
def raising_factory(width: int = 6) -> nn.Module:
    raise ValueError("width must be even")


def not_a_module() -> object:
    return 42


def raising_sampler(n: int, gen: torch.Generator) -> list[Task]:
    raise RuntimeError("the data folder is missing")


def tuple_sampler(n: int, gen: torch.Generator) -> tuple:
    return tuple(regression(n, gen))


def empty_sampler(n: int, gen: torch.Generator) -> list[Task]:
    return []


def wrong_items_sampler(n: int, gen: torch.Generator) -> list:
    return [{"support_x": t.support_x} for t in regression(n, gen)]


def one_too_many(n: int, gen: torch.Generator) -> list[Task]:
    return regression(n + 1, gen)


def wide_sampler(n: int, gen: torch.Generator) -> list[Task]:
    """Tasks with 5 input features: they do not fit ``make_stack`` (3 inputs)."""
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    return [Task(x[:5], x[:5, :1], x[5:], x[5:, :1]) for _ in range(n)]
