"""Calling a module with tensors bound in place of its parameters and buffers, safe for aliased modules.

Why not plain ``torch.func.functional_call``: a module registered under two paths (``self.again = self.mid``,
``nn.ModuleList([block] * 3)``) is swapped once per path and restored in the same order, so the second
path's "original" is the fast weight, and the model is left holding it (a non-leaf from a freed graph)
after the call.  :func:`call_with` binds every (module, attribute) slot exactly once, under the first path
that reaches it, and gives tied tensors (one tensor in two modules) the same new value in every slot.

    out = call_with(model, {"layer.weight": fast_w}, (x,))
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from harness.core.config import ConfigError

__all__ = ["call_with", "refuse_meta_device", "slots"]


def refuse_meta_device(model: nn.Module) -> None:
    """A ConfigError when a parameter or buffer of ``model`` has no values to bind (the meta device)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise ConfigError(f"{kind} {name!r} is on the meta device (a shape without values); build the "
                                  "model on a real device (or model.to_empty(device=...) and initialise it) first")


def slots(module: nn.Module) -> tuple[dict[str, Tensor], dict[int, list[str]]]:
    """(tensor at every path, aliases included; paths of each tensor, one per distinct (module, attribute))."""
    at: dict[str, Tensor] = {}
    paths_of: dict[int, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, t in (*sub._parameters.items(), *sub._buffers.items()):
            if t is None:
                continue
            path = f"{prefix}.{attr}" if prefix else attr
            at[path] = t
            if (id(sub), attr) not in seen:
                seen.add((id(sub), attr))
                paths_of.setdefault(id(t), []).append(path)
    return at, paths_of


class _Call(nn.Module):
    """Runs ``fn`` (a bound method of ``m``, say) while ``m``'s tensors are swapped by ``functional_call``."""

    def __init__(self, m: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.m, self.fn = m, fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def call_with(module: nn.Module, tensors: Mapping[str, Tensor], args: tuple = (),
              kwargs: Mapping[str, Any] | None = None, call: Callable[..., Any] | None = None) -> Any:
    """``module(*args, **kwargs)`` (or ``call(...)``) with ``tensors`` (name -> tensor) in place of those
    parameters/buffers of ``module``."""
    at, paths_of = slots(module)
    bound: dict[str, Tensor] = {}
    for name, value in tensors.items():
        original = at.get(name)
        for path in paths_of.get(id(original), [name]) if original is not None else [name]:
            bound[path] = value
    if call is not None:
        module, bound = _Call(module, call), {f"m.{k}": v for k, v in bound.items()}
    return functional_call(module, bound, tuple(args), dict(kwargs or {}), tie_weights=False, strict=False)
