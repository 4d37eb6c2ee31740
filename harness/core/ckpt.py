"""Checkpointing that is correct under functional fast weights: :func:`harness.checkpoint`.

Why this module exists: the seed report wraps each layer in ``torch.utils.checkpoint(m, x)``.  A
checkpointed function that *reads module parameters* is recomputed at backward time with whatever the module
holds then, not what the forward used, so its gradients are silently wrong once the inner loop binds fast
weights.  :func:`checkpoint` is a drop-in for ``torch.utils.checkpoint.checkpoint(module, *args)``: a
non-reentrant checkpoint whose recomputation runs with every parameter and buffer slot of the model set
back to what it held when the region started, and the model's own ``torch.Generator`` states replayed
(:mod:`harness.core.recompute`).  torch's own checkpoint gets the same treatment inside the engine, so a
model needs no edit; :func:`checkpoint` is for models meant to run in the harness and in a user's own loop.

The recomputation must also see the forward's buffers and RNG state:

* buffers are recorded when the region starts (a copy per buffer state); the first call runs on the
  model's own buffers (one update per forward, exactly as without checkpointing) and a recomputation reads
  a fresh clone of the recorded copy where the buffer has changed since, so buffer-updating layers
  (BatchNorm with any momentum, spectral norm's power iteration, a user's own) recompute what the forward
  computed and the real buffers are updated once;
* the global RNG state is saved and replayed by ``torch.utils.checkpoint`` (``preserve_rng_state=True``),
  module-owned generators by the harness, so dropout and a layer's own noise draw the forward's numbers.

Usage inside a model's ``forward`` (arguments as for ``torch.utils.checkpoint.checkpoint``: positional or
keyword, tensors, tuples of tensors such as an LSTM cell's ``(h, c)``, and non-tensors)::

    from harness import checkpoint
    for block in self.blocks:
        x = checkpoint(block, x)
    h, c = checkpoint(self.cell, x_t, (h, c))

Inside the engine the variant decides whether it checkpoints (``layer_ckpt``) and the region captures the
whole model (so a hook or a closure reading any parameter is exact); outside the engine it checkpoints and
captures the module it is given (a module, a bound method of one, or a ``functools.partial`` of either).
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
from typing import Any, Callable, Iterator

from torch import nn

from harness.core.config import ConfigError
from harness.core.recompute import checkpoint_region, current_frame
from harness.core.state import layer_checkpointing, layer_checkpointing_enabled, recomputing

__all__ = ["checkpoint", "layer_checkpointing", "matching_modules", "modules_checkpointed", "recomputing"]


def _owning_module(function: Callable[..., Any]) -> nn.Module:
    while isinstance(function, functools.partial):
        function = function.func
    if isinstance(function, nn.Module):
        return function
    owner = getattr(function, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    raise TypeError("harness.checkpoint outside the MAML engine needs an nn.Module, a bound method of one or a "
                    f"functools.partial of either (so that the weights it reads can be captured); got "
                    f"{type(function).__name__}. Inside the engine any callable works")


def checkpoint(function: Callable[..., Any], *args: Any, use_reentrant: bool | None = None,
               preserve_rng_state: bool = True, **kwargs: Any) -> Any:
    """Drop-in for ``torch.utils.checkpoint.checkpoint(module, *args, **kwargs)``, always non-reentrant.

    Inside the engine: a plain call unless the variant checkpoints layers, else an exact region over the whole
    model.  Outside: an exact region over ``function``'s module, or a plain call under
    ``layer_checkpointing(False)``.  ``use_reentrant`` is accepted for compatibility.
    """
    frame = current_frame()
    if frame is not None:
        if not frame.checkpointing:
            return function(*args, **kwargs)
        root = frame.root
    elif not layer_checkpointing_enabled():
        return function(*args, **kwargs)
    else:
        root = _owning_module(function)
    return checkpoint_region(root, function, args, kwargs, preserve_rng_state=preserve_rng_state)


def matching_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """The qualified names of ``model``'s submodules that ``patterns`` (``fnmatch``, e.g. ``blocks.*``) select,
    outermost only (a match inside a matched module is left to it).  A pattern that matches nothing is a
    ConfigError naming some of the module names."""
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"--ckpt {pattern!r} matches no submodule of {type(model).__name__}; its modules: "
                              f"{shown or '(none)'}")
        chosen.extend(n for n in hits if n not in chosen)
    return [n for n in chosen if not any(n.startswith(other + ".") for other in chosen)]


@contextlib.contextmanager
def modules_checkpointed(model: nn.Module, names: list[str]) -> Iterator[None]:
    """While the block runs, calling one of the named submodules runs its ``forward`` through
    :func:`checkpoint` (its hooks run outside the region); the model is left as it was."""
    modules = dict(model.named_modules())
    patched: list[nn.Module] = []
    try:
        for name in names:
            module = modules[name]
            if "forward" in vars(module):
                raise ConfigError(f"--ckpt: module {name!r} has its own instance attribute 'forward'; "
                                  "checkpoint it in its forward instead")
            module.forward = functools.partial(checkpoint, type(module).forward.__get__(module))
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward
