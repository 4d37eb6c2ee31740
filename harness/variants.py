"""Variant registry, discovered by convention (like TorchBench's models).

A variant is a declaration: a module in the ``variants/`` package with a
top-level ``VARIANT = Variant(...)``, or an object published under the
entry-point group ``maml_harness.variants`` by a third-party package::

    [project.entry-points."maml_harness.variants"]
    my_variant = "my_pkg.my_module:VARIANT"

A duplicate name or a plugin that fails to import raises
:class:`RegistryError`; nothing is skipped silently.

The project's own ``variants/`` package is loaded from where it is installed, beside this ``harness``
package (:data:`PLUGIN_DIR`), file by file -- never by the name ``variants``, which a ``variants/`` folder in
the current directory would shadow (``python -m harness list`` run from such a folder would run its code).
"""
from __future__ import annotations

import importlib.util
import pkgutil
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from harness.core.config import ConfigError, MetaConfig
from harness.core.schedules import default_segment, default_snapshots

__all__ = ["AUTO_SEGMENT", "AUTO_SNAPSHOTS", "CANONICAL", "ENTRY_POINT_GROUP", "ESTIMATOR_SETTINGS", "ESTIMATOR_TAGS",
           "PLUGIN_DIR", "RegistryError", "Variant", "build_registry", "canonical_name", "get_variant", "registry"]

ESTIMATOR_SETTINGS = {"truncated": ("truncate_steps",), "implicit": ("implicit_lambda", "cg_steps")}  # what each reads
AUTO_SNAPSHOTS = -1  # Variant.snapshots: binomial with ceil(log2 K) stored states (at least 1); --set snapshots=log2
AUTO_SEGMENT = -1  # Variant.step_ckpt: segments of ceil(sqrt K) steps (at least 1); --set step_ckpt=sqrt

ENTRY_POINT_GROUP = "maml_harness.variants"
PLUGIN_PACKAGE = "variants"
PLUGIN_DIR = Path(__file__).resolve().parent.parent / PLUGIN_PACKAGE  # installed beside harness/ (pyproject)


class RegistryError(RuntimeError):
    """A variant plugin is broken (import error, duplicate name, wrong type)."""


@dataclass(frozen=True)
class Variant:
    """The flags that define a variant; the engine turns them into behaviour."""

    name: str
    layer_ckpt: bool = False
    learn_lr: bool = False
    first_order: bool = False
    step_ckpt: int = 0  # segments of n inner steps; 0 = off; AUTO_SEGMENT
    step_rebuild: str = "segment"  # step_ckpt: a segment's steps rebuilt at once ("segment") or one at a time ("step")
    snapshots: int = 0  # binomial over all K steps with at most this many stored states; 0 = off; AUTO_SNAPSHOTS
    lr_per_step: bool = False
    vectorize: bool = False  # all tasks of a meta-batch at once (harness.core.vectorized)
    vmap_chunk: int = 0  # vectorize: at most this many tasks per vmapped chunk (memory); 0 = all at once
    estimator: str = "exact"  # truncated | implicit | reptile (harness.core.estimators); first order: first_order
    truncate_steps: int = 1  # truncated: the last T inner steps back-propagated
    implicit_lambda: float = 1.0  # implicit: the proximal term's lambda
    cg_steps: int = 5  # implicit: conjugate-gradient iterations
    description: str = ""
    memory_budget: int = 0  # bytes a meta-step may take (the planner picks the checkpointing); 0 = none; not a flag

    @property
    def flags(self) -> dict[str, bool | int | float | str]:
        return {"layer_ckpt": self.layer_ckpt, "learn_lr": self.learn_lr, "first_order": self.first_order,
                "step_ckpt": self.step_ckpt, "step_rebuild": self.step_rebuild, "snapshots": self.snapshots,
                "lr_per_step": self.lr_per_step, "vectorize": self.vectorize, "vmap_chunk": self.vmap_chunk,
                **self.estimator_flags}

    @property
    def estimator_flags(self) -> dict[str, str | int | float]:
        """The estimator and the settings it reads; empty for ``exact`` and first order (flags as before)."""
        if self.estimator == "exact":
            return {}
        return {"estimator": self.estimator, **{k: getattr(self, k) for k in ESTIMATOR_SETTINGS.get(self.estimator, ())}}

    @property
    def checkpointed(self) -> bool:
        return self.layer_ckpt or self.step_ckpt != 0 or self.snapshots != 0

    def config(self, **kwargs: object) -> MetaConfig:
        """A :class:`MetaConfig` with this variant's flags over the given sizes.

        A keyword that names a variant flag is applied when it agrees with the variant and refused
        (ConfigError naming the flag) when it does not: a variant's flags are what its name promises;
        ``dataclasses.replace(variant, step_ckpt=2)`` makes another variant.  ``AUTO_SNAPSHOTS`` becomes
        ceil(log2 inner_steps) and ``AUTO_SEGMENT`` ceil(sqrt inner_steps), each at least 1.
        """
        flags = self.flags
        for key in kwargs.keys() & flags.keys():
            if kwargs[key] != flags[key]:
                raise ConfigError(f"variant {self.name!r} has {key}={flags[key]!r}; got {key}={kwargs[key]!r} "
                                  f"(pick a variant with {key}={kwargs[key]!r}, or leave {key} out)")
        steps = int(kwargs.get("inner_steps", MetaConfig.inner_steps))  # type: ignore[call-overload]
        snapshots = default_snapshots(steps) if self.snapshots == AUTO_SNAPSHOTS else self.snapshots
        step_ckpt = default_segment(steps) if self.step_ckpt == AUTO_SEGMENT else self.step_ckpt
        return MetaConfig(**{**kwargs, **flags, "vmap_chunk": self.vmap_chunk or None,  # type: ignore[arg-type]
                             "step_ckpt": step_ckpt, "snapshots": snapshots,
                             "memory_budget": self.memory_budget or None})

    def reference(self) -> "Variant":
        """The same variant without checkpointing, task after task (the agreement oracle)."""
        return replace(self, name=self.name + "/ref", layer_ckpt=False, step_ckpt=0, step_rebuild="segment",
                       snapshots=0, vectorize=False, vmap_chunk=0, memory_budget=0)


ESTIMATOR_TAGS = {"truncated": "trunc", "implicit": "imaml", "reptile": "reptile"}  # in a variant's name, for `fo`


def canonical_name(layer_ckpt: bool, learn_lr: bool, first_order: bool, estimator: str = "exact") -> str:
    """`ckpt`, `lr`, `fo` (or the estimator's tag: `trunc`, `imaml`, `reptile`) in that order, `maml` when none."""
    parts = [p for p, on in (("ckpt", layer_ckpt), ("lr", learn_lr), ("fo", first_order),
                             (ESTIMATOR_TAGS.get(estimator, ""), estimator in ESTIMATOR_TAGS)) if on]
    return "_".join(parts) or "maml"


def _load_file(name: str, path: Path, package_dir: Path | None = None) -> ModuleType:
    """The module ``name`` executed from ``path`` (a package when ``package_dir`` is given), registered in
    ``sys.modules`` under that name in place of anything imported by name before."""
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=None if package_dir is None else [str(package_dir)])
    if spec is None or spec.loader is None:
        raise RegistryError(f"cannot load variant plugin {name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _project_plugins(plugin_dir: Path = PLUGIN_DIR) -> list[tuple[str, ModuleType]]:
    """``(module name, module)`` of every plugin in the project's own ``variants/`` folder, by file location."""
    if not (plugin_dir / "__init__.py").is_file():
        raise RegistryError(f"the project's variant plugins are missing: no {plugin_dir / '__init__.py'}")
    package = sys.modules.get(PLUGIN_PACKAGE)
    if package is None or [Path(p).resolve() for p in getattr(package, "__path__", [])] != [plugin_dir.resolve()]:
        _load_file(PLUGIN_PACKAGE, plugin_dir / "__init__.py", plugin_dir)  # ours, not a same-named folder's
    out = []
    for info in sorted(pkgutil.iter_modules([str(plugin_dir)]), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        name = f"{PLUGIN_PACKAGE}.{info.name}"
        try:
            out.append((name, _load_file(name, plugin_dir / f"{info.name}.py")))
        except Exception as exc:  # a broken plugin is an error, not a skip
            raise RegistryError(f"variant plugin {name} failed to import: {exc}") from exc
    return out


def _collect() -> list[Variant]:
    found: list[Variant] = []
    for name, mod in _project_plugins():
        found.extend(_declared(getattr(mod, "VARIANT", None), name))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise RegistryError(f"variant entry point {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        found.extend(_declared(obj, f"entry point {ep.name!r}"))
    return found


def _declared(obj: object, where: str) -> list[Variant]:
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    for v in items:
        if not isinstance(v, Variant):
            raise RegistryError(f"{where} must define VARIANT = Variant(...) (or a list of them); got {type(v).__name__}")
    return list(items)  # type: ignore[arg-type]


def build_registry(found: list[Variant]) -> dict[str, Variant]:
    registry: dict[str, Variant] = {}
    for v in found:
        if v.name in registry:
            raise RegistryError(f"duplicate variant name {v.name!r}")
        registry[v.name] = v
    return registry


@lru_cache(maxsize=1)
def registry() -> dict[str, Variant]:
    """All variants, the eight canonical ones first in the documented order."""
    reg = build_registry(_collect())
    order = {n: i for i, n in enumerate(CANONICAL)}
    return dict(sorted(reg.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def get_variant(name: str) -> Variant:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown variant {name!r}; valid variants: {', '.join(reg)}")
    return reg[name]


CANONICAL = ("maml", "fo", "lr", "lr_fo", "ckpt", "ckpt_fo", "ckpt_lr", "ckpt_lr_fo")
