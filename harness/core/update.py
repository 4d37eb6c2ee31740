"""The inner-loop update rule: plain SGD with a fixed or learnable step size per parameter.

One rule for the sequential engine (``MetaLearner.inner_loop``) and the vectorized one
(``harness.core.vectorized``), so that the two cannot drift apart; the agreement tests compare them.

    python -m pytest tests/test_vectorized.py tests/test_engine_agreement.py
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from torch import Tensor

__all__ = ["LRLookup", "sgd_update", "step_lr"]


class LRLookup(Protocol):
    """What the update needs of the learnable LRs (``harness.core.engine.InnerLRs``)."""

    def lookup(self, values: Mapping[str, Tensor], name: str, step: int) -> Tensor: ...


def step_lr(lrs: LRLookup | None, values: Mapping[str, Tensor] | None, name: str, step: int,
            inner_lr: float) -> Tensor | float:
    """Parameter ``name``'s step size at inner step ``step``: its learnable LR, or the fixed ``inner_lr``."""
    if lrs is None or values is None:
        return inner_lr
    return lrs.lookup(values, name, step)


def sgd_update(weights: Mapping[str, Tensor], grads: Mapping[str, Tensor],
               lr: Callable[[str], Tensor | float]) -> dict[str, Tensor]:
    """``w - lr(name) * g`` for every parameter in ``grads``; the others are carried unchanged.

    Out of place, so the graph through the inner loop stays intact for second order.
    """
    out = dict(weights)
    for name, g in grads.items():
        out[name] = weights[name] - lr(name) * g
    return out
