"""What one meta-step computes, and the types every part of the harness shares.

``MetaConfig`` is the engine's whole input besides the model and the loss; ``Task`` is one episode;
``ConfigError`` is bad input (one line, exit code 2 at the command line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

__all__ = ["AMP_MODES", "ESTIMATORS", "LR_GRANULARITIES", "PATH_FREE_ESTIMATORS", "STEP_REBUILDS", "ConfigError", "LossFn", "MetaConfig", "Task", "Weights"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Weights = dict[str, Tensor]
LR_GRANULARITIES = ("layer", "tensor", "element")
AMP_MODES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
STEP_REBUILDS = ("segment", "step")  # a step_ckpt segment's backward: all its steps' graphs at once, or one at a time
# the meta-gradient a meta-step computes (harness.core.estimators says what each one is)
ESTIMATORS = ("exact", "first_order", "truncated", "implicit", "reptile")
PATH_FREE_ESTIMATORS = ("implicit", "reptile")  # inner loop run for its values only, no graph through it


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the valid choices."""


@dataclass(frozen=True)
class Task:
    """One episode: support set for the inner loop, query set for the outer loss."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Task":
        def move(t: Tensor) -> Tensor:
            return t.to(device, dtype) if (dtype is not None and t.is_floating_point()) else t.to(device)
        return Task(*(move(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


@dataclass(frozen=True)
class MetaConfig:
    """Everything that decides what one meta-step computes."""

    inner_steps: int = 1
    inner_lr: float = 0.01
    # the same as estimator="first_order"; None: from the estimator.  Always a bool after construction, and when
    # given it decides (replace(cfg, first_order=False) of a first-order config is exact, as before the estimators)
    first_order: bool | None = None
    estimator: str = "exact"  # exact | first_order | truncated | implicit | reptile (harness.core.estimators)
    truncate_steps: int = 1  # truncated: back-propagate through the last min(T, K) inner steps only
    implicit_lambda: float = 1.0  # implicit: lambda of the proximal term lambda/2 |phi - theta|^2
    cg_steps: int = 5  # implicit: conjugate-gradient iterations of (I + H/lambda) v = g
    learn_lr: bool = False
    lr_granularity: str = "layer"  # layer | tensor | element
    lr_per_step: bool = False  # MAML++ LSLR: a separate LR for every inner step
    layer_ckpt: bool = False
    step_ckpt: int = 0  # 0: off; n: checkpoint segments of n inner steps
    step_rebuild: str = "segment"  # step_ckpt: rebuild a segment's n steps at once, or "step": one at a time
    snapshots: int = 0  # 0: off; s: binomial (Revolve) checkpointing of all K steps, <= s states stored
    adapt_last: int | None = None  # adapt only the last N parameter-owning modules; None: all
    amp: str = "off"  # off | fp16 | bf16: autocast over forward and loss
    vectorize: bool = False  # all tasks of a meta-batch at once (torch.func.vmap; harness.core.vectorized)
    vmap_chunk: int | None = None  # vectorize: at most this many tasks per vmapped chunk; None: all
    ckpt_modules: tuple[str, ...] = ()  # submodules (fnmatch on qualified names) checkpointed under layer_ckpt
    # bytes a meta-step may allocate; None: no budget.  The harness plans it before running (run, bench,
    # check: harness.bench.planner picks the fastest exact checkpointing predicted to fit); the engine ignores it
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        if self.inner_steps < 0:
            raise ConfigError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if not (self.inner_lr > 0 and math.isfinite(self.inner_lr)):
            raise ConfigError(f"inner_lr must be a positive number, got {self.inner_lr}")
        if self.lr_granularity not in LR_GRANULARITIES:
            raise ConfigError(f"lr_granularity must be one of {', '.join(LR_GRANULARITIES)}; got {self.lr_granularity!r}")
        if self.step_ckpt < 0:
            raise ConfigError(f"step_ckpt must be >= 0 (0 = off), got {self.step_ckpt}")
        self._check_schedule()
        self._check_estimator()
        if self.amp not in AMP_MODES:
            raise ConfigError(f"unknown precision {self.amp!r}; valid choices: {', '.join(AMP_MODES)}")
        if self.adapt_last is not None and self.adapt_last < 1:
            raise ConfigError(f"adapt_last must be >= 1 or None (all), got {self.adapt_last}")
        if isinstance(self.ckpt_modules, str) or not all(isinstance(p, str) and p for p in self.ckpt_modules):
            raise ConfigError(f"ckpt_modules must be a tuple of module-name patterns, got {self.ckpt_modules!r}")
        if self.memory_budget is not None and (isinstance(self.memory_budget, bool) or not isinstance(
                self.memory_budget, int) or self.memory_budget < 1):
            raise ConfigError(f"memory_budget must be a number of bytes >= 1 or None (no budget), got {self.memory_budget!r}")
        if self.vmap_chunk is not None and self.vmap_chunk < 1:
            raise ConfigError(f"vmap_chunk must be >= 1 or None (all tasks), got {self.vmap_chunk}")
        if self.vmap_chunk is not None and not self.vectorize:
            raise ConfigError(f"vmap_chunk={self.vmap_chunk} needs vectorize (a vectorized variant: vmaml, vfo, vlr, "
                              "vlr_fo, or vectorize=1)")
        if self.vectorize and (self.layer_ckpt or self.step_ckpt or self.snapshots):
            raise ConfigError("vectorize cannot be combined with layer_ckpt/step_ckpt/snapshots: non-reentrant "
                              "checkpointing fails under torch.func transforms (\"don't yet support saved tensor "
                              "hooks\"); valid: vectorize=0, or no checkpointing")

    def _check_schedule(self) -> None:
        """The step-checkpoint schedule: segments (``step_ckpt``, rebuilt per segment or per step) or binomial."""
        if self.step_rebuild not in STEP_REBUILDS:
            raise ConfigError(f"step_rebuild must be one of {', '.join(STEP_REBUILDS)}; got {self.step_rebuild!r}")
        if isinstance(self.snapshots, bool) or not isinstance(self.snapshots, int) or self.snapshots < 0:
            raise ConfigError(f"snapshots must be an integer >= 0 (0 = off; s: binomial checkpointing with at most "
                              f"s stored states), got {self.snapshots!r}")
        if self.snapshots and self.step_ckpt:
            raise ConfigError(f"snapshots={self.snapshots} (binomial over all inner steps) and step_ckpt="
                              f"{self.step_ckpt} (segments) are exclusive; valid: one of them 0")
        if self.step_rebuild == "step" and not self.step_ckpt:
            raise ConfigError("step_rebuild='step' rebuilds step_ckpt segments one step at a time and needs "
                              "step_ckpt=n > 0; valid: step_rebuild='segment', or step_ckpt=n")

    def _check_estimator(self) -> None:
        """The estimator and its settings; the one place ``first_order`` and ``estimator="first_order"`` meet."""
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}; valid choices: {', '.join(ESTIMATORS)}")
        if self.first_order and self.estimator not in ("exact", "first_order"):
            raise ConfigError(f"first_order=True is the first_order estimator, not {self.estimator!r}; valid: "
                              f"first_order=False with estimator={self.estimator!r}, or estimator='first_order'")
        if self.first_order is False and self.estimator == "first_order":
            object.__setattr__(self, "estimator", "exact")
        first = bool(self.first_order) or self.estimator == "first_order"
        object.__setattr__(self, "first_order", first)
        if first:
            object.__setattr__(self, "estimator", "first_order")
        if isinstance(self.truncate_steps, bool) or not isinstance(self.truncate_steps, int) or self.truncate_steps < 0:
            raise ConfigError(f"truncate_steps must be an integer >= 0 (the last T inner steps back-propagated), "
                              f"got {self.truncate_steps!r}")
        if not (self.implicit_lambda > 0 and math.isfinite(self.implicit_lambda)):
            raise ConfigError(f"implicit_lambda must be a positive number, got {self.implicit_lambda!r}")
        if isinstance(self.cg_steps, bool) or not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise ConfigError(f"cg_steps must be an integer >= 1, got {self.cg_steps!r}")
        if self.estimator in ("exact", "first_order"):
            return
        if self.vectorize:
            raise ConfigError(f"estimator {self.estimator!r} runs task after task; valid: vectorize=0, or the "
                              "exact/first_order estimator (vmaml, vfo, vlr, vlr_fo)")
        if self.estimator in PATH_FREE_ESTIMATORS:
            self._check_path_free()

    def _check_path_free(self) -> None:
        """implicit and reptile keep no graph through the inner loop: what needs one is refused."""
        why = {"implicit": "the implicit meta-gradient does not depend on the inner path, so an inner LR has none",
               "reptile": "reptile's direction theta - phi_K is not a gradient, so an inner LR has none"}[self.estimator]
        if self.learn_lr or self.lr_per_step:
            raise ConfigError(f"estimator {self.estimator!r} cannot learn inner LRs: {why}; valid: learn_lr=False")
        if self.memory_budget is not None:
            raise ConfigError(f"estimator {self.estimator!r} keeps no graph through the inner steps: a memory budget "
                              "plans checkpointing of that graph; valid: no memory_budget")
        if self.step_ckpt or self.snapshots:
            raise ConfigError(f"estimator {self.estimator!r} keeps no graph through the inner steps, so there is no "
                              "step to checkpoint; valid: step_ckpt=0 and snapshots=0 (layer_ckpt composes)")
        if self.adapt_last is not None:
            raise ConfigError(f"estimator {self.estimator!r} adapts every parameter (the meta-gradient of a "
                              f"non-adapted one is not implemented); valid: adapt_last=None, got {self.adapt_last}")
        if self.amp != "off":
            raise ConfigError(f"estimator {self.estimator!r} runs in full precision only; valid: amp='off', "
                              f"got {self.amp!r}")

    def exact(self) -> "MetaConfig":
        """The same computation with the exact estimator and no checkpointing: the fidelity reference."""
        return replace(self.reference(), estimator="exact", first_order=False)

    def reference(self) -> "MetaConfig":
        """The same computation without any checkpointing, task after task: the agreement oracle."""
        return replace(self, layer_ckpt=False, step_ckpt=0, step_rebuild="segment", snapshots=0, vectorize=False,
                       vmap_chunk=None, memory_budget=None)
