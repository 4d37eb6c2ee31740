"""torch's checkpoint, called as torch's and routed through the engine, in every torch the harness supports.

Why: the engine must decide every ``torch.utils.checkpoint.checkpoint`` call in a user's model (a plain call,
torch's own, or an exact region: :mod:`harness.core.recompute`), however the model imported it.  Where to hook
depends on torch's version:

* **torch >= 2.14**: ``checkpoint`` (the function, the decorator form, ``functools.partial`` of it) and
  ``checkpoint_sequential`` call one module function, ``_checkpoint_impl(function, args, kwargs, **options)``;
  routing replaces it.
* **torch 2.4 to 2.13** (the H200 image has 2.11): ``checkpoint``'s body calls two module globals when it runs,
  ``CheckpointFunction.apply`` (reentrant) and ``_checkpoint_without_reentrant_generator`` (non-reentrant);
  routing replaces both.  A non-reentrant call is routed inside torch's generator protocol (torch's body calls
  the function between two ``next``), a reentrant one by the shim's ``apply``.

Either way each call asks :func:`install`'s ``frame_of`` what to do: ``None`` (not in an engine forward):
torch's own checkpoint, unchanged; a frame that does not checkpoint: a plain call; else torch's non-reentrant
checkpoint with the context function ``region_contexts(frame, context_fn, debug, options)`` gives.
``tests/test_recompute.py`` runs on the installed torch; ``tests/benchmarks/gpu_session.sh`` ran on 2.11.
"""
from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint as _tuc

__all__ = ["install", "torch_checkpoint", "routed"]

_IMPL: Callable[..., Any] | None = getattr(_tuc, "_checkpoint_impl", None)  # torch >= 2.14
_GENERATOR: Callable[..., Iterator[None]] | None = getattr(_tuc, "_checkpoint_without_reentrant_generator", None)
_REENTRANT = _tuc.CheckpointFunction
_NOOP = _tuc.noop_context_fn
_lock = threading.Lock()
_hooks: list[Callable[..., Any]] = []  # [frame_of, region_contexts], set by install


def _generator_parameters() -> dict[str, Any]:
    """The generator's parameters between ``fn`` and ``*args`` with their defaults (torch 2.11: preserve_rng_state,
    context_fn, determinism_check, debug, early_stop); read once, not per region."""
    if _GENERATOR is None:
        return {}
    params = list(inspect.signature(_GENERATOR).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind is p.POSITIONAL_OR_KEYWORD}


_GENERATOR_DEFAULTS = _generator_parameters()


def _unsupported() -> RuntimeError:
    return RuntimeError(f"harness cannot route torch.utils.checkpoint in torch {torch.__version__} (it has neither "
                        "_checkpoint_impl nor _checkpoint_without_reentrant_generator); use torch 2.4 to 2.14")


def torch_checkpoint(function: Callable[..., Any], args: tuple, kwargs: dict, **options: Any) -> Any:
    """torch's own non-reentrant checkpoint of ``function(*args, **kwargs)``, never routed."""
    if _IMPL is not None:
        return _IMPL(function, args, kwargs, use_reentrant=False, **options)
    if _GENERATOR is None:
        raise _unsupported()
    unknown = set(options) - set(_GENERATOR_DEFAULTS)
    if unknown:
        raise TypeError(f"torch {torch.__version__}'s checkpoint takes no {', '.join(sorted(unknown))}")
    gen = _GENERATOR(function, *(options.get(n, d) for n, d in _GENERATOR_DEFAULTS.items()), *args, **kwargs)
    next(gen)  # torch's body, as in torch 2.13: the pre-forward logic, the forward, the post-forward logic
    try:
        out = function(*args, **kwargs)
    except BaseException as exc:  # the generator leaves its hooks and contexts, as torch's body does
        try:
            gen.throw(exc)
        except StopIteration:
            pass
        raise
    try:
        next(gen)
    except StopIteration:
        return out
    raise AssertionError("torch's checkpoint generator yielded more than twice")


def _contexts(frame: Any, context_fn: Any, debug: bool, options: dict) -> Callable[..., Any]:
    """The region's context function (install's ``region_contexts``; torch's no-op one passed on as none)."""
    return _hooks[1](frame, None if context_fn is _NOOP else context_fn, debug, options)


def _region(frame: Any, function: Callable[..., Any], args: tuple, kwargs: dict, context_fn: Any, debug: bool,
            options: dict) -> Any:
    contexts = _contexts(frame, context_fn, debug, options)
    return torch_checkpoint(function, args, kwargs, context_fn=contexts, **options)


def _routed_impl(function: Callable[..., Any], args: tuple, kwargs: dict, *, use_reentrant: bool | None = None,
                 context_fn: Any = _NOOP, debug: bool = False, **options: Any) -> Any:
    """torch >= 2.14's ``_checkpoint_impl`` once routed."""
    frame = _hooks[0]()
    if frame is None:  # not the engine's forward: torch's checkpoint, unchanged (a peer's own, a user's loop)
        return _IMPL(function, args, kwargs, use_reentrant=use_reentrant, context_fn=context_fn,  # type: ignore[misc]
                     debug=debug, **options)
    if not frame.checkpointing:
        return function(*args, **kwargs)
    return _region(frame, function, args, kwargs, context_fn, debug, options)


def _routed_generator(fn: Callable[..., Any], *rest: Any, **kwargs: Any) -> Iterator[None]:
    """torch < 2.14's non-reentrant generator once routed: torch's body runs ``fn`` between our two yields."""
    frame = _hooks[0]()
    if frame is None:
        yield from _GENERATOR(fn, *rest, **kwargs)  # type: ignore[misc]
        return
    if not frame.checkpointing:
        yield
        return
    names = list(_GENERATOR_DEFAULTS)
    given = dict(zip(names, rest))
    args = rest[len(names):]
    options = {n: given[n] for n in names if n in given and n not in ("context_fn", "debug")}
    contexts = _contexts(frame, given.get("context_fn", _NOOP), bool(given.get("debug", False)), options)
    values = {**_GENERATOR_DEFAULTS, **given, "context_fn": contexts}
    yield from _GENERATOR(fn, *(values[n] for n in names), *args, **kwargs)  # type: ignore[misc]


class _RoutedReentrant(_REENTRANT):  # type: ignore[misc,valid-type]
    """torch < 2.14's ``CheckpointFunction`` once routed: ``checkpoint(..., use_reentrant=True)`` calls ``apply``."""

    @classmethod
    def apply(cls, function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:  # type: ignore[override]
        if cls is not _RoutedReentrant:  # a user's subclass of CheckpointFunction made after routing: its own apply
            return super(_REENTRANT, cls).apply(function, preserve_rng_state, *args)
        frame = _hooks[0]()
        if frame is None:
            return _REENTRANT.apply(function, preserve_rng_state, *args)
        if not frame.checkpointing:
            return function(*args)
        return _region(frame, function, args, {}, _NOOP, False, {"preserve_rng_state": preserve_rng_state})


def routed() -> bool:
    """Whether torch's checkpoint module is routed now."""
    if _IMPL is not None:
        return getattr(_tuc, "_checkpoint_impl", None) is _routed_impl
    return getattr(_tuc, "_checkpoint_without_reentrant_generator", None) is _routed_generator \
        and _tuc.CheckpointFunction is _RoutedReentrant


def install(frame_of: Callable[[], Any], region_contexts: Callable[..., Any]) -> None:
    """Route torch's checkpoint (idempotent): ``frame_of()`` says what each call does, ``region_contexts(frame,
    context_fn, debug, options)`` gives a region's context function (see the module docstring)."""
    if routed():
        return
    if _IMPL is None and _GENERATOR is None:
        raise _unsupported()
    with _lock:
        _hooks[:] = [frame_of, region_contexts]
        if _IMPL is not None:
            _tuc._checkpoint_impl = _routed_impl
        else:
            _tuc._checkpoint_without_reentrant_generator = _routed_generator
            _tuc.CheckpointFunction = _RoutedReentrant
