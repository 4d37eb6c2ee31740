"""Checkpointing that is correct under functional fast weights: :func:`harness.checkpoint`.

Why this module exists: the seed report wraps each layer in
``torch.utils.checkpoint(m, x)``.  A checkpointed function that *reads module
parameters* is recomputed at backward time with whatever parameters are bound
to the module then, not those the forward used, so its gradients are silently
wrong once the inner loop rebinds fast weights.  :func:`checkpoint` is the
drop-in replacement: it looks up the layer's *current* parameter tensors (the
fast weights that ``torch.func.functional_call`` bound) and passes them to
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` as explicit
inputs, so the recomputation sees exactly the tensors the forward saw.

The recomputation must also see the forward's buffers and RNG state:

* buffers are snapshotted *before* the first call; the first call runs on the
  module's bound buffers (one update per forward, exactly as without
  checkpointing) and every recomputation runs on a fresh clone of the snapshot,
  so buffer-updating layers (BatchNorm with any momentum, spectral norm's power
  iteration, a user's own) recompute what the forward computed and the real
  buffers are updated once;
* the RNG state is saved and replayed by ``torch.utils.checkpoint``
  (``preserve_rng_state=True``), so dropout draws the forward's masks.

Usage inside a model's ``forward`` (arguments as for ``torch.utils.checkpoint.checkpoint``: positional or
keyword, tensors, tuples of tensors such as an LSTM cell's ``(h, c)``, and non-tensors)::

    from harness import checkpoint
    for block in self.blocks:
        x = checkpoint(block, x)
    h, c = checkpoint(self.cell, x_t, (h, c))

The MAML engine switches it on and off per variant (``layer_checkpointing``);
outside the engine it checkpoints, like the call it replaces.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch.utils.checkpoint as _tuc
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from harness.core.binding import call_with
from harness.core.state import layer_checkpointing, layer_checkpointing_enabled, recompute_scope, recomputing

__all__ = ["checkpoint", "layer_checkpointing", "recomputing"]


def _owning_module(function: Callable[..., Any]) -> nn.Module:
    if isinstance(function, nn.Module):
        return function
    owner = getattr(function, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    raise TypeError("harness.checkpoint needs an nn.Module or a bound method of one (so that the fast weights "
                    f"it reads can be bound); got {type(function).__name__}. A function of its tensor arguments "
                    "alone can use torch.utils.checkpoint.checkpoint directly")


def checkpoint(function: Callable[..., Any], *args: Any, use_reentrant: bool | None = None,
               preserve_rng_state: bool = True, **kwargs: Any) -> Any:
    """Drop-in for ``torch.utils.checkpoint.checkpoint(module, *args, **kwargs)``.

    Binds the module's current parameter tensors (fast weights under ``functional_call``) as explicit
    inputs of a non-reentrant checkpoint (``use_reentrant`` is accepted for compatibility; the
    checkpoint is always non-reentrant).  ``function`` is a module or a bound method of one.  A plain
    call while layer checkpointing is switched off.
    """
    if not layer_checkpointing_enabled():
        return function(*args, **kwargs)
    module = _owning_module(function)
    call = None if function is module else function
    named = list(module.named_parameters())
    names = [n for n, _ in named]
    leaves, spec = tree_flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    snapshot = {n: b.clone() for n, b in module.named_buffers()}  # before the first call
    calls = 0

    def run(*flat: Tensor) -> Any:
        nonlocal calls
        calls += 1
        bound = dict(zip(names, flat[: len(names)]))
        if calls > 1:  # a recomputation: a fresh clone of the buffers as they were before the first call
            bound.update({n: b.clone() for n, b in snapshot.items()})
        now = list(leaves)
        for i, t in zip(where, flat[len(names):]):
            now[i] = t
        a, kw = tree_unflatten(now, spec)
        with recompute_scope() if calls > 1 else contextlib.nullcontext():
            return call_with(module, bound, a, kw, call=call)

    return _tuc.checkpoint(run, *[p for _, p in named], *[leaves[i] for i in where], use_reentrant=False,
                           preserve_rng_state=preserve_rng_state)


