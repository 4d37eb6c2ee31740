"""What one ablation is: the preset, the variants, the sizes and how many seeds; the ONE place for its defaults.

``AblationSpec(preset="sinusoid", run_id="x")`` fills every size left ``None`` from :data:`DEFAULTS`
(per preset, else :data:`GENERIC`), so the command line (``python -m harness ablate --preset sinusoid``),
the library and the tests agree on what "the default ablation" is.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, fields
from typing import Any

from harness.core.config import ConfigError
from harness.settings import check_folder_name, check_int
from harness.loop.spec import RunSpec
from harness.variants import CANONICAL, Variant, get_variant, registry
from harness.zoo.presets import get_preset
from harness.zoo.user import UserSpecs, spec_name

__all__ = ["AblationSpec", "command_line", "Cell", "counterpart", "plan", "DEFAULTS", "GENERIC", "SIZES", "MAX_JOBS"]

# Sizes of the default ablation per preset (CPU-sized; seeds >= 10 so that seed-level intervals mean something).
# sinusoid: 10 seeds x 4 base variants + 4 checkpointed variants on 2 seeds fit in 10 minutes on 2 cores
# (measured: results/ablation-sinusoid/table.md gives the wall time of the committed run).
DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": dict(meta_steps=300, seeds=10, meta_batch=10, eval_tasks=100, eval_every=50, verify_seeds=2),
    "digits": dict(meta_steps=300, seeds=10, meta_batch=8, eval_tasks=100, eval_every=50, verify_seeds=2),
    "quick": dict(meta_steps=20, seeds=3, eval_tasks=20, eval_every=5, verify_seeds=2),
    "conv4": dict(meta_steps=200, seeds=10, eval_tasks=50, eval_every=20, verify_seeds=2),
    "omniglot": dict(meta_steps=2000, seeds=10, eval_tasks=200, eval_every=100, verify_seeds=2),
}
# Any other preset: its own meta-steps and meta-batch, these for the rest.
GENERIC: dict[str, Any] = dict(seeds=10, eval_tasks=100, eval_every=None, verify_seeds=2)
SIZES = ("meta_steps", "seeds", "meta_batch", "eval_tasks", "eval_every", "verify_seeds")
MAX_JOBS = 2  # default worker processes: the cells are single-threaded, the CPU machines here have 2 cores


@dataclass(frozen=True)
class AblationSpec:
    """One ablation; sizes left ``None`` come from :data:`DEFAULTS` (``verify_seeds``: seeds on which each
    checkpointed variant is trained and checked bit for bit against its non-checkpointed counterpart)."""

    preset: str
    run_id: str = ""
    variants: tuple[str, ...] = CANONICAL
    meta_steps: int | None = None
    seeds: int | None = None
    eval_tasks: int | None = None
    eval_every: int | None = None
    verify_seeds: int | None = None
    meta_batch: int | None = None
    inner_steps: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    task_overrides: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None  # None: 1 for small models on the CPU, torch's default otherwise
    jobs: int | None = None  # cells trained at once in worker processes; None: one per core, at most MAX_JOBS
    model: str | None = None  # --model / --tasks / --ckpt: the user's own model and tasks (harness.zoo.user)
    tasks: str | None = None
    ckpt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        preset = get_preset(self.preset)
        object.__setattr__(self, "ckpt", tuple(self.ckpt))
        if not self.run_id:
            object.__setattr__(self, "run_id", f"ablation-{self.preset}{self._user_suffix()}")
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name in SIZES}
        base = {"meta_steps": preset.meta_steps, "meta_batch": None, **GENERIC, **DEFAULTS.get(self.preset, {})}
        for name, value in given.items():
            object.__setattr__(self, name, base.get(name) if value is None else value)
        if self.eval_every is None:
            object.__setattr__(self, "eval_every", max(1, self.meta_steps // 10))
        if self.jobs is None:
            object.__setattr__(self, "jobs", max(1, min(MAX_JOBS, os.cpu_count() or 1)))
        if self.verify_seeds > self.seeds:
            object.__setattr__(self, "verify_seeds", self.seeds)
        self._validate()

    def _validate(self) -> None:
        if not self.variants:
            raise ConfigError("--variants is empty; valid variants: " + ", ".join(registry()))
        for v in self.variants:
            get_variant(v)
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"--variants lists a variant twice: {','.join(self.variants)}")
        # the command line's bounds (harness.settings.BOUNDS); a library caller gets the --allow-huge ones
        for name in ("meta_steps", "seeds", "eval_tasks", "eval_every", "verify_seeds", "jobs", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), allow_huge=True)
        check_folder_name(self.run_id)
        RunSpec(variant=self.variants[0], preset=self.preset, device=self.device, dtype=self.dtype,
                inner_steps=self.inner_steps, meta_batch=self.meta_batch,
                **self.user().fields())  # device/dtype/sizes checks

    def user(self) -> UserSpecs:
        return UserSpecs(self.model, self.tasks, self.ckpt)

    def _user_suffix(self) -> str:
        u = self.user()
        names = [spec_name(u.model) if u.model else "", spec_name(u.tasks) if u.tasks else "",
                 "ckpt" if u.ckpt else ""]
        return "".join(f"-{n}" for n in names if n)

    def seeds_for(self, checkpointed: bool) -> range:
        """Every seed for base variants; the first ``verify_seeds`` for checkpointed ones (they are bit-identical)."""
        return range(self.verify_seeds if checkpointed else self.seeds)

    def fingerprint(self) -> dict[str, Any]:
        """What a stored cell must match to be reused (seed counts are not part of a cell's identity)."""
        overrides = {k: str(v) for k, v in self.task_overrides.items() if k != "download"}
        out = {"preset": self.preset, "meta_steps": self.meta_steps, "eval_tasks": self.eval_tasks,
               "eval_every": self.eval_every, "device": self.device, "dtype": self.dtype,
               "meta_batch": self.meta_batch, "inner_steps": self.inner_steps, "task_overrides": overrides}
        if self.model_overrides:
            out["model_overrides"] = {k: str(v) for k, v in self.model_overrides.items()}
        out.update({k: list(v) if k == "ckpt" else v for k, v in self.user().fields().items()})
        return out


Cell = tuple[Variant, str]  # (variant, role): role "requested" or "counterpart"


def counterpart(v: Variant) -> Variant:
    """The non-checkpointed variant with the same other flags: a registered one if any, else ``v.reference()``."""
    ref = v.reference()
    for r in registry().values():
        if r.flags == ref.flags:
            return r
    return ref


def plan(spec: AblationSpec) -> list[Cell]:
    """(variant, role) to train: the requested ones, then the counterparts the checkpoint check needs."""
    cells = [(get_variant(n), "requested") for n in spec.variants]
    names = set(spec.variants)
    for v, _ in list(cells):
        if v.checkpointed:
            c = counterpart(v)
            if c.name not in names:
                cells.append((c, "counterpart"))
                names.add(c.name)
    return cells


def command_line(spec: AblationSpec, sets: tuple[str, ...] | list[str] = ()) -> str:
    """The command line that reproduces ``spec`` (every default spelled out; ``sets``: the ``--set`` items)."""
    parts = ["python -m harness ablate", f"--preset {spec.preset}"]
    if spec.variants != CANONICAL:
        parts.append(f"--variants {','.join(spec.variants)}")
    parts += [f"--meta-steps {spec.meta_steps}", f"--seeds {spec.seeds}", f"--verify-seeds {spec.verify_seeds}",
              f"--eval-tasks {spec.eval_tasks}", f"--eval-every {spec.eval_every}"]
    for flag, value in (("--meta-batch", spec.meta_batch), ("--inner-steps", spec.inner_steps),
                        ("--threads", spec.threads), ("--ways", spec.task_overrides.get("n_way")),
                        ("--shots", spec.task_overrides.get("k_shot")),
                        ("--data-root", spec.task_overrides.get("data_root"))):
        if value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    parts += [f"{flag} {shlex.quote(v)}" for flag, v in (("--model", spec.model), ("--tasks", spec.tasks)) if v]
    parts += [f"--ckpt {shlex.quote(p)}" for p in spec.ckpt]
    parts += [f"--set {shlex.quote(item)}" for item in sets]
    if spec.device != "cpu" or spec.dtype != "float32":
        parts += [f"--device {spec.device}", f"--dtype {spec.dtype}"]
    if spec.run_id != f"ablation-{spec.preset}{spec._user_suffix()}":
        parts.append(f"--run-id {spec.run_id}")
    return " ".join(parts)
