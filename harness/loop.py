"""The common episodic loop and the gradient-agreement check.

One meta-step: sample a meta-batch of tasks, K inner steps on each support set,
query loss, one outer optimiser step over the initial weights and the
learnable LRs.  Every run first checks its variant's meta-gradients against
the non-checkpointed reference of the same variant, on the same initial
weights and the same task batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from harness.engine import ConfigError, MetaLearner, Task, agreement
from harness.presets import Preset, get_preset
from harness.variants import Variant, get_variant

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")


class Diverged(RuntimeError):
    """The meta-loss became NaN or infinite."""


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

    def __post_init__(self) -> None:
        get_variant(self.variant), get_preset(self.preset)  # raise ConfigError listing valid names
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; valid devices: {', '.join(DEVICES)}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available on this machine; use --device cpu")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        if self.inner_steps is not None and self.inner_steps < 0:
            raise ConfigError(f"inner steps must be >= 0, got {self.inner_steps}")
        if self.meta_batch is not None and self.meta_batch < 1:
            raise ConfigError(f"meta-batch must be >= 1, got {self.meta_batch}")
        if self.meta_steps is not None and self.meta_steps < 0:
            raise ConfigError(f"meta-steps must be >= 0, got {self.meta_steps}")

    @property
    def preset_obj(self) -> Preset:
        return get_preset(self.preset)

    @property
    def variant_obj(self) -> Variant:
        return get_variant(self.variant)

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
    """A built cell: the learner, its task sampler, and a generator for task batches."""

    def __init__(self, spec: RunSpec, variant: Variant | None = None, task_overrides: dict | None = None,
                 model_overrides: dict | None = None) -> None:
        self.spec = spec
        self.variant = variant or spec.variant_obj
        r = spec.resolved()
        self.sizes = r
        self.device = torch.device(spec.device)
        self.task = spec.preset_obj.task(**(task_overrides or {}))
        torch.manual_seed(spec.seed)
        model = spec.preset_obj.model(**(model_overrides or {})).to(self.device, spec.torch_dtype)
        cfg = self.variant.config(inner_steps=r["inner_steps"], inner_lr=r["inner_lr"], adapt_last=r["adapt_last"])
        self.learner = MetaLearner(model, cfg, self.task.loss_fn).to(self.device)
        self.gen = torch.Generator().manual_seed(spec.seed + 1)

    def sample(self) -> list[Task]:
        return [t.to(self.device, self.spec.torch_dtype) for t in self.task.sample(self.sizes["meta_batch"], self.gen)]

    def reference_learner(self) -> MetaLearner:
        """Same initial weights, LRs and buffers; no checkpointing."""
        ref = copy.deepcopy(self.learner)
        ref.cfg = self.learner.cfg.reference()
        return ref


def check_agreement(exp: Experiment, tasks: list[Task]) -> dict[str, float | None]:
    """Meta-gradients of ``exp`` vs its non-checkpointed reference on the same weights and tasks.

    Buffers are restored in between, so both see the same running statistics.
    """
    ref = exp.reference_learner()
    buffers = {n: b.clone() for n, b in exp.learner.named_buffers()}
    grads, _ = exp.learner.meta_gradients(tasks)
    with torch.no_grad():
        for n, b in exp.learner.named_buffers():
            b.copy_(buffers[n])
    ref_grads, _ = ref.meta_gradients(tasks)
    return agreement(grads, ref_grads)


def train(exp: Experiment, meta_steps: int, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Meta-train with Adam over the initial weights and LRs; returns the query loss per step."""
    opt = torch.optim.Adam(exp.learner.parameters(), lr=exp.sizes["outer_lr"])
    losses: list[float] = []
    for step in range(meta_steps):
        opt.zero_grad(set_to_none=True)
        loss = exp.learner.step(exp.sample())
        if not math.isfinite(loss):
            raise Diverged(f"meta-loss became {loss} at meta-step {step}")
        opt.step()
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return losses
