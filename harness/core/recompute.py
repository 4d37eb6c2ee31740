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

* **Routing.**  What ``torch.utils.checkpoint.checkpoint`` (however it is imported: a module, a bound method, a
  closure, ``functools.partial(checkpoint, use_reentrant=False)`` as Hugging Face models do, the decorator form)
  and ``checkpoint_sequential`` call when they run -- ``_checkpoint_impl`` in torch 2.14, the reentrant and
  non-reentrant implementations before it (:mod:`harness.core.torch_routing`) -- is replaced once.  Outside the engine's
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
from torch import Tensor, nn

from harness.core import torch_routing
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


# -- routing torch's checkpoint (harness.core.torch_routing says where, per torch version) ------------------
def install_routing() -> None:
    """Route torch's checkpoint through :func:`current_frame`'s decision (idempotent)."""
    torch_routing.install(current_frame, _region_contexts)


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


class _Region:
    """One checkpointed region: the parameter and buffer slots its forward read, as they were when it started,
    and the states of the model's own generators then.

    What the forward read is recorded while it runs (:func:`_recording_reads`): every tensor a module hands
    out as an attribute (``self.weight``, ``self.running_mean``, hooks and plain-list modules included) or
    through ``parameters()``/``buffers()``.  Only those slots are kept for the recomputation, so a region holds
    the fast weights it needs and no others (holding every slot of the model kept up to one more weight copy
    alive through the outer backward).  Slots read only through ``module._parameters[...]`` directly are not
    seen (the agreement check's plain reference would show the difference).
    """

    def __init__(self, root: nn.Module | None, rng: bool) -> None:
        self.root = root
        self.read: set[int] = set()
        self.params: list[tuple[dict, str, Tensor]] = []
        self.buffers: list[tuple[dict, str, Tensor]] = []
        self._at_start: list[tuple[dict, str, Tensor, Tensor]] = []
        self.generators: list[tuple[torch.Generator, Tensor]] = []
        if root is not None:
            copies = _copies.setdefault(root, _BufferCopies())
            self._at_start = [(m._buffers, k, t, copies.copy_of(t))
                              for m in root.modules() for k, t in m._buffers.items() if t is not None]
            self.generators = [(g, g.get_state()) for g in owned_generators(root)] if rng else []

    def finish(self) -> None:
        """After the forward: keep the slots it read (parameters as bound now, buffers as copied at the start)."""
        if self.root is not None:
            self.params = [(m._parameters, k, t) for m in self.root.modules()
                           for k, t in m._parameters.items() if t is not None and id(t) in self.read]
        self.buffers = [(d, k, copy) for d, k, live, copy in self._at_start if id(live) in self.read]
        self._at_start, self.read = [], set()


def _open_regions() -> list[_Region]:
    regions = getattr(_local, "regions", None)
    if regions is None:
        regions = _local.regions = []
    return regions


_MODULE_GETATTR = nn.Module.__getattr__
_MODULE_NAMED_MEMBERS = nn.Module._named_members
_patch_lock, _patch_depth = threading.Lock(), [0]


def _recording_getattr(self: nn.Module, name: str) -> Any:
    value = _MODULE_GETATTR(self, name)
    if isinstance(value, Tensor):
        for region in _open_regions():
            region.read.add(id(value))
    return value


def _recording_named_members(self: nn.Module, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    for name, value in _MODULE_NAMED_MEMBERS(self, *args, **kwargs):
        if isinstance(value, Tensor):
            for region in _open_regions():
                region.read.add(id(value))
        yield name, value


@contextlib.contextmanager
def _recording_reads(region: _Region) -> Iterator[None]:
    """The forward context of a region: module attribute reads are recorded into it (and into the regions
    around it) while it runs; ``nn.Module``'s lookup is patched only while some region is open."""
    with _patch_lock:
        if _patch_depth[0] == 0:
            nn.Module.__getattr__, nn.Module._named_members = _recording_getattr, _recording_named_members
        _patch_depth[0] += 1
    _open_regions().append(region)
    try:
        yield
    finally:
        _open_regions().pop()
        with _patch_lock:
            _patch_depth[0] -= 1
            if _patch_depth[0] == 0:
                nn.Module.__getattr__, nn.Module._named_members = _MODULE_GETATTR, _MODULE_NAMED_MEMBERS
        region.finish()


class _Rebind:
    """The recompute context of one region: its slots and generator states, restored afterwards."""

    def __init__(self, region: _Region) -> None:
        self.region = region
        self._undo: list[contextlib.ExitStack] = []

    def __enter__(self) -> "_Rebind":
        region, stack = self.region, contextlib.ExitStack()
        found = [(d, k, d.get(k)) for d, k, _ in (*region.params, *region.buffers)]
        found_states = [(g, g.get_state()) for g, _ in region.generators]

        def undo() -> None:
            for d, k, t in found:
                d[k] = t
            for g, state in found_states:
                g.set_state(state)

        stack.callback(undo)
        for d, k, t in region.params:
            d[k] = t
        with torch.no_grad():  # a fresh clone: the recomputation may update it in place, undetectably
            for d, k, copy in region.buffers:
                d[k] = copy.clone()
        for g, state in region.generators:
            g.set_state(state)
        stack.enter_context(recompute_scope())
        stack.enter_context(_pushed(Frame(region.root, True)))
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
    install_routing()
    contexts = _region_contexts(Frame(root, True), context_fn, debug, options)
    return torch_routing.torch_checkpoint(function, args, kwargs, context_fn=contexts, **options)


def _region_contexts(frame: Frame, context_fn: Callable[[], tuple[Any, Any]] | None, debug: bool,
                     options: dict) -> Callable[[], tuple[Any, Any]]:
    """The context function of one region under ``frame.root``: ours around the user's (selective checkpointing)."""
    unknown = set(options) - set(_CHECKPOINT_OPTIONS)
    if unknown:
        raise TypeError(f"checkpoint got unexpected keyword arguments {sorted(unknown)}")
    if debug:
        raise ConfigError("checkpoint(debug=True) cannot be combined with the engine's exact recomputation "
                          "(torch allows no context_fn with debug); drop debug=True")
    region = _Region(frame.root, rng=options.get("preserve_rng_state", True))

    def contexts() -> tuple[Any, Any]:
        forward, recompute = context_fn() if context_fn is not None else (contextlib.nullcontext(),) * 2
        return _Chained(_recording_reads(region), forward), _Chained(_Rebind(region), recompute)
    return contexts


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
