"""Checkpointing that is correct under functional fast weights.

Why this module exists: the seed report wraps each layer in
``torch.utils.checkpoint(m, x)``.  A checkpointed function that *reads module
parameters* is recomputed at backward time with whatever parameters are bound
to the module then, not those the forward used, so its gradients are silently
wrong once the inner loop rebinds fast weights.  :func:`checkpoint` is the
drop-in replacement: it looks up the layer's *current* parameter tensors (the
fast weights that ``torch.func.functional_call`` bound) and passes them to
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` as explicit
inputs, so the recomputation sees exactly the tensors the forward saw.

Buffers (BatchNorm running statistics) are the other trap: recomputation runs
the layer's forward again and would update ``running_mean`` twice.  The rule
here: the *first* call of a checkpointed function uses the module's real
buffers (one update per forward, exactly as without checkpointing); every
recomputation runs on private clones of the buffers, so the real ones are
never touched by a recompute.  In training mode BatchNorm normalises with batch
statistics, so the clone does not change the recomputed values; in eval mode
the buffers are read only, so the clone holds the same values.

Usage inside a model's ``forward``::

    from harness import checkpoint
    for block in self.blocks:
        x = checkpoint(block, x)

The MAML engine switches it on and off per variant (``layer_checkpointing``);
outside the engine it checkpoints, like the call it replaces.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint as _tuc
from torch import nn
from torch.func import functional_call

__all__ = ["checkpoint", "checkpoint_function", "checkpoint_segment", "layer_checkpointing", "recomputing"]


class _State:
    layer_ckpt: bool = True  # is harness.checkpoint active? (engine sets per variant)
    recompute_depth: int = 0  # > 0 while a checkpointed function is being recomputed


@contextlib.contextmanager
def layer_checkpointing(enabled: bool) -> Iterator[None]:
    """Switch :func:`checkpoint` on or off for the duration of the block."""
    previous, _State.layer_ckpt = _State.layer_ckpt, enabled
    try:
        yield
    finally:
        _State.layer_ckpt = previous


def recomputing() -> bool:
    """True while a checkpointed function is being recomputed for backward."""
    return _State.recompute_depth > 0


def checkpoint_function(fn: Callable[..., Any], *inputs: Any, **kwargs: Any) -> Any:
    """Non-reentrant checkpoint of ``fn(*inputs, recompute=bool)``.

    ``fn`` receives ``recompute=True`` on every call after the first (the
    recomputations for backward), and :func:`recomputing` is true while it
    runs, so nested checkpoints and buffer updates can tell the two apart.
    Everything ``fn`` differentiates through must be among ``inputs``.
    """
    calls = 0

    def run(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        is_recompute = calls > 1 or recomputing()
        if is_recompute:
            _State.recompute_depth += 1
        try:
            return fn(*args, recompute=is_recompute, **kwargs)
        finally:
            if is_recompute:
                _State.recompute_depth -= 1

    return _tuc.checkpoint(run, *inputs, use_reentrant=False)


class _Segment(torch.autograd.Function):
    """Forward without a graph; backward recomputes with the full graph and differentiates it.

    For functions that take gradients *inside* (whole MAML inner steps): a non-reentrant
    checkpoint would recompute the region every time the inner ``autograd.grad`` unpacks
    one of its saved tensors, which for a segment of n steps recomputes the earlier steps
    again and again (measured: 133 MiB for one 8-step segment against 32 MiB unchecked).
    """

    @staticmethod
    def forward(ctx, fn, *inputs):  # noqa: ANN001
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            args = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            out = fn(*args, recompute=False, build_graph=False)
        return tuple(o.detach() for o in out)

    @staticmethod
    def backward(ctx, *grads_out):  # noqa: ANN001
        inputs = ctx.saved_tensors
        _State.recompute_depth += 1
        try:
            with torch.enable_grad():
                args = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
                out = ctx.fn(*args, recompute=True, build_graph=True)
        finally:
            _State.recompute_depth -= 1
        wanted = [a for a in args if a.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grads_out, allow_unused=True))
        return (None, *[next(grads) if a.requires_grad else None for a in args])


def checkpoint_segment(fn: Callable[..., Any], *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Checkpoint ``fn(*inputs, recompute=bool, build_graph=bool) -> tuple of tensors``.

    The forward runs with ``build_graph=False`` (only values are needed) and keeps only
    ``inputs``; the backward reruns ``fn`` with ``build_graph=True, recompute=True`` and
    differentiates its outputs.  Supports one backward through it (meta-gradients), not
    double backward.
    """
    return _Segment.apply(fn, *inputs)


def _call_module(module: nn.Module, names: list[str], args: tuple, n_params: int,
                 *flat: Any, recompute: bool) -> Any:
    params = dict(zip(names, flat[:n_params]))
    inputs = flat[n_params:]
    if recompute:  # never update the real buffers from a recomputation
        params.update({n: b.clone() for n, b in module.named_buffers()})
    return functional_call(module, params, tuple(inputs) + tuple(args), strict=False)


def checkpoint(module: nn.Module, *inputs: Any) -> Any:
    """Drop-in for ``torch.utils.checkpoint.checkpoint(module, *inputs)``.

    Binds the module's current parameter tensors (fast weights under
    ``functional_call``) as explicit inputs of a non-reentrant checkpoint.
    A no-op wrapper (plain ``module(*inputs)``) while layer checkpointing is
    switched off.
    """
    if not _State.layer_ckpt:
        return module(*inputs)
    named = [(n, p) for n, p in module.named_parameters() if p is not None]
    names = [n for n, _ in named]
    tensors = [p for _, p in named]
    tensor_inputs = [x for x in inputs if isinstance(x, torch.Tensor)]
    other = tuple(x for x in inputs if not isinstance(x, torch.Tensor))
    if len(tensor_inputs) != len(inputs):
        raise TypeError("harness.checkpoint: pass tensors positionally; bind other arguments in the module")
    return checkpoint_function(
        lambda *flat, recompute: _call_module(module, names, other, len(tensors), *flat, recompute=recompute),
        *tensors, *tensor_inputs,
    )
