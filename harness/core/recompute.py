"""Every recomputation reads what its forward read: checkpointed regions under the fast weights of their step.

Why this module exists: a checkpointed region is run twice, once in the forward and again when backward
needs its saved tensors.  The engine binds the fast weights of an inner step into the model only while that
step's forward runs (``torch.func.functional_call``); a recomputation starts later, inside the inner
``autograd.grad`` or the outer backward, and a region that reads its parameters from the model then reads
the *initial* weights.  The meta-gradients are silently wrong (2.6% to 34% on small float64 models with
``use_reentrant=False``; with ``use_reentrant=True`` the checkpointed layers get no meta-gradient at all).
Passing a module's own parameters as explicit inputs (the old ``harness.checkpoint``) fixes only the
parameters that module registers, not a hook reading the root's parameters, a module held in a plain list,
or a closure.

The mechanism, one for every way a region can be started:

* **Routing.**  ``torch.utils.checkpoint._checkpoint_impl`` -- the one function that
  ``torch.utils.checkpoint.checkpoint`` (however it is imported: a module, a bound method, a closure,
  ``functools.partial(checkpoint, use_reentrant=False)`` as Hugging Face models do, the decorator form) and
  ``checkpoint_sequential`` call in torch 2.14 -- is replaced once, by :func:`_routed`.  Outside the engine's
  forward it defers to torch, unchanged (a peer library's own checkpoints, torch-maml's step segments, stay
  torch's; ``layer_checkpointing(False)`` switches only :func:`harness.checkpoint`).
* **One switch.**  Inside the engine's forward (:func:`bound_forward`) the variant's ``layer_ckpt`` decides
  every checkpoint in the model, :func:`harness.checkpoint` and torch's alike: off, a plain call (so the
  agreement check's reference is truly non-checkpointed); on, :func:`checkpoint_region`.
* **The binding kept for the recomputation.**  :func:`checkpoint_region` runs torch's non-reentrant
  checkpoint (a reentrant request too: reentrant checkpoints give no gradient to what the region reads from
  the model and refuse ``autograd.grad``) with a ``context_fn`` whose recompute context is :class:`_Rebind`:
  at the region's start it records the tensor in every parameter and buffer slot of the root model and the
  state of every ``torch.Generator`` a module of it owns; the recomputation runs with exactly those slots and
  states put back (and restores what it found), with nested checkpoints routed the same way.  A buffer is
  kept as a copy made when the region starts (shared by the regions that saw the same values); each
  recomputation reads a fresh clone of it, so the forward's buffer updates happen once and every
  recomputation sees the values the forward saw.  The
  user's own ``context_fn`` (selective checkpointing) still applies: its recompute context is entered inside
  ours.

Outside the engine, in a user's own loop, torch's checkpoint is torch's (whatever the loop binds when the
recomputation runs is what it reads); :func:`harness.checkpoint` still captures its module's slots.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.utils.checkpoint as _tuc
from torch import Tensor, nn

from harness.core.config import ConfigError
from harness.core.state import recompute_scope

__all__ = ["bound_forward", "checkpoint_region", "current_frame", "install_routing", "owned_generators",
           "plain_checkpoints"]


class Frame(NamedTuple):
    """One engine forward on this thread: the model whose slots a region captures, and the variant's switch."""

    root: nn.Module | None
    checkpointing: bool


_local = threading.local()


def _frames() -> list[Frame]:
    frames = getattr(_local, "frames", None)
    if frames is None:
        frames = _local.frames = []
    return frames


def current_frame() -> Frame | None:
    """The innermost engine forward (or recomputation) running on this thread, if any."""
    frames = _frames()
    return frames[-1] if frames else None


@contextlib.contextmanager
def _pushed(frame: Frame) -> Iterator[None]:
    frames = _frames()
    frames.append(frame)
    try:
        yield
    finally:
        frames.pop()


@contextlib.contextmanager
def bound_forward(root: nn.Module, checkpointing: bool) -> Iterator[None]:
    """The engine's forward of ``root``: every checkpoint inside is a plain call, or (``checkpointing``) an
    exact region that captures ``root``'s slots."""
    install_routing()
    with _pushed(Frame(root, checkpointing)):
        yield


@contextlib.contextmanager
def plain_checkpoints() -> Iterator[None]:
    """Every checkpoint in the block is a plain call, torch's included (what the references run)."""
    install_routing()
    with _pushed(Frame(None, False)):
        yield


# -- routing torch's checkpoint ---------------------------------------------------------------------------
_TORCH_IMPL: Callable[..., Any] | None = getattr(_tuc, "_checkpoint_impl", None)
_install_lock = threading.Lock()


def _routed(function: Callable[..., Any], args: tuple, kwargs: dict, **options: Any) -> Any:
    """What ``torch.utils.checkpoint.checkpoint`` does once routing is installed (see the module docstring)."""
    frame = current_frame()
    if frame is None:  # not the engine's forward: torch's checkpoint, unchanged (a peer's own, a user's loop)
        return _TORCH_IMPL(function, args, kwargs, **options)  # type: ignore[misc]
    if not frame.checkpointing:
        return function(*args, **kwargs)
    return checkpoint_region(frame.root, function, args, kwargs, **options)


def install_routing() -> None:
    """Route torch's checkpoint through :func:`_routed` (idempotent); needs torch's ``_checkpoint_impl``."""
    if getattr(_tuc, "_checkpoint_impl", None) is _routed:
        return
    if _TORCH_IMPL is None:
        raise RuntimeError(f"harness needs torch.utils.checkpoint._checkpoint_impl (torch >= 2.14) to keep "
                           f"recomputations exact; this torch is {torch.__version__}")
    with _install_lock:
        _tuc._checkpoint_impl = _routed


# -- what a region read when it started --------------------------------------------------------------------
def owned_generators(root: nn.Module) -> list[torch.Generator]:
    """The ``torch.Generator`` objects the modules of ``root`` hold as attributes (or in a list/tuple/dict
    attribute): the random streams a region may draw from besides the global ones."""
    found: dict[int, torch.Generator] = {}
    for module in root.modules():
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
            for item in items:
                if isinstance(item, torch.Generator):
                    found.setdefault(id(item), item)
    return list(found.values())


class _BufferCopies:
    """Copies of buffers as they were, shared between regions while the buffer still holds the same values.

    Equality of values, not the version counter: a kernel that updates an argument in place (BatchNorm's
    running statistics inside ``native_batch_norm``) does not bump the argument's version.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref, weakref.ref]] = {}

    def copy_of(self, buffer: Tensor) -> Tensor:
        known = self._by_id.get(id(buffer))
        if known is not None:
            ref, copy_ref = known
            copy = copy_ref()
            if ref() is buffer and copy is not None and torch.equal(copy, buffer):
                return copy
        with torch.no_grad():
            copy = buffer.clone()
        self._by_id[id(buffer)] = (weakref.ref(buffer), weakref.ref(copy))
        return copy


_copies: "weakref.WeakKeyDictionary[nn.Module, _BufferCopies]" = weakref.WeakKeyDictionary()


class _Entry(NamedTuple):
    """A region's start: (slot dict, key, tensor) for every parameter, (slot dict, key, a copy of the values)
    for every buffer, (generator, state) for the generators the model owns."""

    root: nn.Module | None
    params: list[tuple[dict, str, Tensor]]
    buffers: list[tuple[dict, str, Tensor]]
    generators: list[tuple[torch.Generator, Tensor]]


def _capture(root: nn.Module | None, rng: bool) -> _Entry:
    if root is None:
        return _Entry(None, [], [], [])
    copies = _copies.setdefault(root, _BufferCopies())
    params, buffers = [], []
    for module in root.modules():
        params.extend((module._parameters, k, t) for k, t in module._parameters.items() if t is not None)
        buffers.extend((module._buffers, k, copies.copy_of(t)) for k, t in module._buffers.items() if t is not None)
    generators = [(g, g.get_state()) for g in owned_generators(root)] if rng else []
    return _Entry(root, params, buffers, generators)


class _Rebind:
    """The recompute context of one region: its start's slots and generator states, restored afterwards."""

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry
        self._undo: list[contextlib.ExitStack] = []

    def __enter__(self) -> "_Rebind":
        stack = contextlib.ExitStack()
        found_params = [(d, k, d.get(k)) for d, k, _ in self.entry.params]
        found_buffers = [(d, k, d.get(k)) for d, k, _ in self.entry.buffers]
        found_states = [(g, g.get_state()) for g, _ in self.entry.generators]

        def undo() -> None:
            for d, k, t in (*found_params, *found_buffers):
                d[k] = t
            for g, state in found_states:
                g.set_state(state)

        stack.callback(undo)
        for d, k, t in self.entry.params:
            d[k] = t
        with torch.no_grad():  # a fresh clone: the recomputation may update it in place, undetectably
            for d, k, copy in self.entry.buffers:
                d[k] = copy.clone()
        for g, state in self.entry.generators:
            g.set_state(state)
        stack.enter_context(recompute_scope())
        stack.enter_context(_pushed(Frame(self.entry.root, True)))
        self._undo.append(stack)
        return self

    def __exit__(self, *exc: object) -> None:
        self._undo.pop().close()


_CHECKPOINT_OPTIONS = ("preserve_rng_state", "determinism_check", "early_stop", "respect_saved_tensors_hooks")


def checkpoint_region(root: nn.Module | None, function: Callable[..., Any], args: tuple, kwargs: dict, *,
                      use_reentrant: bool | None = None, context_fn: Callable[[], tuple[Any, Any]] | None = None,
                      debug: bool = False, **options: Any) -> Any:
    """``function(*args, **kwargs)`` as a non-reentrant checkpoint whose recomputation sees ``root`` as the
    forward saw it (see the module docstring).  ``use_reentrant`` is accepted and ignored; the options of
    ``torch.utils.checkpoint.checkpoint`` are passed on."""
    unknown = set(options) - set(_CHECKPOINT_OPTIONS)
    if unknown:
        raise TypeError(f"checkpoint got unexpected keyword arguments {sorted(unknown)}")
    if debug:
        raise ConfigError("checkpoint(debug=True) cannot be combined with the engine's exact recomputation "
                          "(torch allows no context_fn with debug); drop debug=True")
    install_routing()
    entry = _capture(root, rng=options.get("preserve_rng_state", True))

    def contexts() -> tuple[Any, Any]:
        forward, recompute = context_fn() if context_fn is not None else (contextlib.nullcontext(),) * 2
        return forward, _Chained(_Rebind(entry), recompute)

    return _TORCH_IMPL(function, args, kwargs, use_reentrant=False, context_fn=contexts, **options)  # type: ignore[misc]


class _Chained:
    """Two context managers entered as one (ours first), re-enterable as torch's recompute context must be."""

    def __init__(self, outer: Any, inner: Any) -> None:
        self.outer, self.inner = outer, inner

    def __enter__(self) -> None:
        self.outer.__enter__()
        try:
            self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(None, None, None)
