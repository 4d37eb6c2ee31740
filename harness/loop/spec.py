"""What one cell is and how it is built: :class:`RunSpec` (a variant on a preset or on the user's model, with
its sizes and settings, validated once) and :class:`Experiment` (the learner, the task stream).

The path of a run: the command line (or a bench cell, ``Cell.run_spec``) -> ``RunSpec`` (``harness.settings``
checks every value once; the spec carries them typed, split by destination, to wherever the cell runs) -> ``Experiment``
-> :mod:`harness.loop.agreement` (the check against the non-checkpointed reference) -> :mod:`harness.loop.train`
(the one training loop).  Try: ``python -m harness run --variant ckpt_lr``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from harness.core.config import ConfigError, Task
from harness.core.engine import MetaLearner
from harness.settings import DTYPES, CellSettings, check_int, check_precision, split_settings, variant_with
from harness.variants import Variant, get_variant
from harness.zoo.presets import Preset, get_preset
from harness.zoo.user import make_model, make_tasks, normalize_spec

__all__ = ["Experiment", "RunSpec", "SMALL_MODEL_PARAMS", "default_threads"]

SMALL_MODEL_PARAMS = 100_000


def default_threads(device: str, model: torch.nn.Module) -> int | None:
    """1 for small models on the CPU, else None (torch's default).

    Small meta-steps are dominated by per-op overhead, which intra-op threads only add to (and on a
    loaded machine each op then waits for every thread); bigger models keep torch's default.
    """
    if device != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None


@dataclass(frozen=True)
class RunSpec:
    """One cell: a variant on a preset with its sizes, validated at construction."""

    variant: str
    preset: str = "quick"
    device: str = "cpu"
    dtype: str = "float32"
    inner_steps: int | None = None  # None: the preset's
    meta_batch: int | None = None
    meta_steps: int | None = None
    seed: int = 0
    amp: str = "off"  # off | fp16 | bf16
    model: str | None = None  # --model pkg.module:factory or file.py:factory (harness.zoo.user); None: the preset's
    tasks: str | None = None  # --tasks ...:sampler; None: the preset's task family
    ckpt: tuple[str, ...] = ()  # --ckpt patterns: MetaConfig.ckpt_modules
    # the --set settings by destination (model and task keywords, variant settings, launch); a dict is split
    settings: CellSettings = field(default_factory=lambda: CellSettings({}, {}, {}, {}, {}), hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", split_settings(self.settings))
        get_variant(self.variant), get_preset(self.preset)  # raise ConfigError listing valid names
        for flag, text in (("--model", self.model), ("--tasks", self.tasks)):
            if text is not None:
                normalize_spec(text, flag)  # the form only; importing is the Experiment's
        object.__setattr__(self, "ckpt", tuple(self.ckpt))
        check_precision(self.device, self.dtype, self.amp)
        for name in ("inner_steps", "meta_batch", "meta_steps", "seed"):  # the command line checked the
            if getattr(self, name) is not None:  # tighter bounds unless --allow-huge; these always hold
                check_int(name, getattr(self, name), allow_huge=True)

    @property
    def preset_obj(self) -> Preset:
        return get_preset(self.preset)

    @property
    def variant_obj(self) -> Variant:
        """The registered variant with the spec's variant settings applied (``step_ckpt``, ``snapshots``, ...)."""
        return variant_with(get_variant(self.variant), self.settings.variant)

    def fields(self) -> dict[str, Any]:
        """The spec's own fields (not its settings: those are :meth:`CellSettings.flat`), as rows store them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolved(self) -> dict[str, Any]:
        p = self.preset_obj
        return {"inner_steps": p.inner_steps if self.inner_steps is None else self.inner_steps,
                "meta_batch": p.meta_batch if self.meta_batch is None else self.meta_batch,
                "meta_steps": p.meta_steps if self.meta_steps is None else self.meta_steps,
                "inner_lr": p.inner_lr, "outer_lr": p.outer_lr, "adapt_last": p.adapt_last}


class Experiment:
    """A built cell: the learner, its task sampler, and a generator for task batches.

    The model and tasks are the preset's, or the user's (``spec.model``/``spec.tasks``,
    :mod:`harness.zoo.user`); the preset gives the sizes either way.  Everything else comes from the spec
    (``spec.variant_obj``, ``spec.settings``); ``variant`` and the overrides are for library callers that
    build a variant of their own (the ablation, tests)."""

    def __init__(self, spec: RunSpec, variant: Variant | None = None, task_overrides: dict | None = None,
                 model_overrides: dict | None = None) -> None:
        self.spec = spec
        self.variant = variant or spec.variant_obj
        r = spec.resolved()
        self.sizes = r
        self.device = torch.device(spec.device)
        tasks_kw = {**spec.settings.task, **(task_overrides or {})} or None
        model_kw = {**spec.settings.model, **(model_overrides or {})} or None
        self.task = make_tasks(spec.preset_obj, spec.tasks, tasks_kw)
        torch.manual_seed(spec.seed)
        model = make_model(spec.preset_obj, spec.model, model_kw).to(self.device, spec.torch_dtype)
        cfg = self.variant.config(inner_steps=r["inner_steps"], inner_lr=r["inner_lr"], adapt_last=r["adapt_last"],
                                  amp=spec.amp, ckpt_modules=spec.ckpt)
        self.learner = MetaLearner(model, cfg, self.task.loss_fn).to(self.device)
        self.gen = torch.Generator().manual_seed(spec.seed + 1)

    def sample(self, gen: torch.Generator | None = None) -> list[Task]:
        """A meta-batch from the experiment's task stream (or from ``gen``, e.g. a copy of it)."""
        tasks = self.task.sample(self.sizes["meta_batch"], self.gen if gen is None else gen)
        return [t.to(self.device, self.spec.torch_dtype) for t in tasks]

    def reference_learner(self, amp: str | None = None, exact: bool = False) -> MetaLearner:
        """The same model, LRs and loss without checkpointing (and optionally another precision; with ``exact``,
        the exact estimator: the fidelity reference of an approximate one, ``MetaConfig.exact``).

        Shared, not copied: a hook or a closure in the model that reads its own module (``self``) reads the
        same tensors in the reference; a deep copy would leave it reading the original's.  Buffers the
        reference updates are the learner's: :func:`check_agreement` restores them between computations.
        """
        cfg = self.learner.cfg.exact() if exact else self.learner.cfg.reference()
        cfg = replace(cfg, amp=self.learner.cfg.amp if amp is None else amp)
        ref = MetaLearner(self.learner.model, cfg, self.learner.loss_fn)
        ref.lrs = self.learner.lrs
        return ref

    def new_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.spec.amp == "fp16" else None
