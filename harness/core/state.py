"""The checkpointing switches shared by layer and step checkpoints: is ``harness.checkpoint`` active, and is
a recomputation for backward running now?  (One small module so that ``ckpt`` and ``segment`` share it
without importing each other.)"""
from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["layer_checkpointing", "layer_checkpointing_enabled", "recompute_scope", "recomputing"]


class _State:
    layer_ckpt: bool = True  # is harness.checkpoint active? (the engine sets it per variant)
    recompute_depth: int = 0  # > 0 while a checkpointed function is being recomputed


@contextlib.contextmanager
def layer_checkpointing(enabled: bool) -> Iterator[None]:
    """Switch :func:`harness.checkpoint` on or off for the duration of the block."""
    previous, _State.layer_ckpt = _State.layer_ckpt, enabled
    try:
        yield
    finally:
        _State.layer_ckpt = previous


def layer_checkpointing_enabled() -> bool:
    return _State.layer_ckpt


@contextlib.contextmanager
def recompute_scope() -> Iterator[None]:
    """Mark the block as a recomputation for backward (:func:`recomputing` is true inside)."""
    _State.recompute_depth += 1
    try:
        yield
    finally:
        _State.recompute_depth -= 1


def recomputing() -> bool:
    """True while a checkpointed function is being recomputed for backward."""
    return _State.recompute_depth > 0
