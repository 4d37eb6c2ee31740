"""Step checkpoints: a whole segment of inner steps kept as its inputs only, rebuilt in the outer backward.

The recomputation must compute what the forward computed.  What it depends on besides its inputs:

* the RNG state (dropout masks): captured before the forward, replayed for the recomputation inside
  ``torch.random.fork_rng``, so the masks are the forward's and the stream after the backward is as the
  backward found it -- the same rule as ``torch.utils.checkpoint`` (CPU, and every CUDA device in use),
  and the same for the ``torch.Generator`` objects the model's modules own (a layer's own noise);
* the buffers: the caller snapshots them before the forward and binds clones for the recomputation
  (``MetaLearner.adapt``);
* parameters that need no gradient (frozen): passed through, marked non-differentiable.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

from harness.core.state import recompute_scope

__all__ = ["RngState", "capture_rng", "checkpoint_segment", "replay_rng", "set_rng"]


class RngState(NamedTuple):
    """The CPU generator state, the states of the CUDA devices in use, and of the generators given."""

    cpu: Tensor
    cuda: dict[int, Tensor]
    owned: tuple[tuple[torch.Generator, Tensor], ...] = ()


def _cuda_devices(tensors: Iterable[Tensor]) -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    found = {t.device.index for t in tensors if isinstance(t, Tensor) and t.is_cuda}
    found.add(torch.cuda.current_device())
    return sorted(i for i in found if i is not None)


def capture_rng(tensors: Iterable[Tensor] = (), generators: Iterable[torch.Generator] = ()) -> RngState:
    """The RNG state now, for the CPU, the CUDA devices of ``tensors`` (and the current one) and ``generators``."""
    return RngState(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in _cuda_devices(tensors)},
                    tuple((g, g.get_state()) for g in generators))


def set_rng(state: RngState) -> None:
    """Set the generators of ``state`` (CPU, its CUDA devices, the owned ones) to the states it holds."""
    torch.set_rng_state(state.cpu)
    for index, s in state.cuda.items():
        torch.cuda.set_rng_state(s, index)
    for g, s in state.owned:
        g.set_state(s)


@contextlib.contextmanager
def replay_rng(state: RngState) -> Iterator[None]:
    """Run the block from ``state``; the generators are restored afterwards (the stream is not consumed)."""
    found = [(g, g.get_state()) for g, _ in state.owned]
    with torch.random.fork_rng(devices=list(state.cuda), enabled=True):
        set_rng(state)
        try:
            yield
        finally:
            for g, s in found:
                g.set_state(s)


class _Segment(torch.autograd.Function):
    """Forward without a graph; backward recomputes with the full graph and differentiates it.

    For functions that take gradients *inside* (whole MAML inner steps): a non-reentrant
    checkpoint would recompute the region every time the inner ``autograd.grad`` unpacks
    one of its saved tensors, which for a segment of n steps recomputes the earlier steps
    again and again (measured: 133 MiB for one 8-step segment against 32 MiB unchecked).
    """

    @staticmethod
    def forward(ctx, fn, generators, *inputs):  # noqa: ANN001
        ctx.fn, ctx.rng = fn, capture_rng(inputs, generators)
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            args = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            out = fn(*args, recompute=False, build_graph=False)
        detached = tuple(o.detach() for o in out)
        ctx.mark_non_differentiable(*[d for d, o in zip(detached, out) if not o.requires_grad])
        return detached

    @staticmethod
    def backward(ctx, *grads_out):  # noqa: ANN001
        inputs = ctx.saved_tensors
        with recompute_scope(), replay_rng(ctx.rng), torch.enable_grad():
            args = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
            out = ctx.fn(*args, recompute=True, build_graph=True)
        pairs = [(o, g) for o, g in zip(out, grads_out) if o.requires_grad and g is not None]
        wanted = [a for a in args if a.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, None, *[next(grads) if a.requires_grad else None for a in args])


def checkpoint_segment(fn: Callable[..., Any], *inputs: Tensor,
                       generators: Iterable[torch.Generator] = ()) -> tuple[Tensor, ...]:
    """Checkpoint ``fn(*inputs, recompute=bool, build_graph=bool) -> tuple of tensors``.

    The forward runs with ``build_graph=False`` (only values are needed) and keeps only
    ``inputs`` and the RNG state (global, and of ``generators``); the backward replays it, reruns ``fn`` with
    ``build_graph=True, recompute=True`` and differentiates its outputs.  Outputs that need no
    gradient (frozen parameters passed through) are non-differentiable.  Supports one
    backward through it (meta-gradients), not double backward.
    """
    return _Segment.apply(fn, tuple(generators), *inputs)
