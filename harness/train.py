"""The common episodic loop and the gradient-agreement check.

One meta-step: sample a meta-batch of tasks, K inner steps on each support set,
query loss, one outer optimiser step over the initial weights and the
learnable LRs.  Every run first checks its variant's meta-gradients against
the non-checkpointed reference of the same variant, on the same initial
weights and the same task batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from harness.core.config import AMP_MODES, ConfigError, Task
from harness.core.engine import MetaLearner
from harness.core.grads import agreement
from harness.core.recompute import owned_generators
from harness.core.segment import capture_rng, replay_rng
from harness import distributed
from harness.settings import check_int
from harness.zoo.presets import Preset, get_preset
from harness.zoo.user import make_model, make_tasks, normalize_spec
from harness.variants import Variant, get_variant

__all__ = ["valid_amps", "DEVICES", "DTYPES", "MAX_CONSECUTIVE_SKIPS", "SMALL_MODEL_PARAMS", "Diverged", "DivergenceCheck",
           "Experiment", "RunSpec", "TrainLog", "check_agreement", "check_amp", "check_device",
           "default_threads", "meta_step", "train", "unscaled_meta_gradients"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")


SMALL_MODEL_PARAMS = 100_000


def default_threads(device: str, model: torch.nn.Module) -> int | None:
    """1 for small models on the CPU, else None (torch's default).

    Small meta-steps are dominated by per-op overhead, which intra-op threads only add to (and on a
    loaded machine each op then waits for every thread); bigger models keep torch's default.
    """
    if device != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None


class Diverged(RuntimeError):
    """The meta-loss became NaN or infinite."""


def check_device(device: str) -> None:
    """An unknown device, or CUDA without CUDA: a ConfigError naming the valid choices."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available on this machine; use --device cpu")


def valid_amps(device: str, *, fp16_on_cpu: bool = False) -> list[str]:
    """The precisions ``device`` can train in: fp16 needs CUDA (GradScaler) unless a CPU GradScaler is asked
    for; bf16 needs a CPU or a GPU that supports it."""
    if device == "cuda":
        return ["off", *(["bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []), "fp16"]
    return ["off", "bf16", *(["fp16"] if fp16_on_cpu else [])]


def check_amp(amp: str, device: str, *, fp16_on_cpu: bool = False) -> None:
    """The one precision check (``run``, ``diagnose``, and each entry of ``bench --amp``)."""
    valid = valid_amps(device, fp16_on_cpu=fp16_on_cpu)
    choices = f"valid choices on {device}: {', '.join(valid)}"
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown precision {amp!r} in --amp; {choices}")
    if amp not in valid:
        why = "fp16 needs a CUDA device (GradScaler)" if amp == "fp16" else f"{amp} is not supported by this GPU"
        raise ConfigError(f"--amp {amp} is not available on {device} ({why}); {choices}")


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

    def __post_init__(self) -> None:
        get_variant(self.variant), get_preset(self.preset)  # raise ConfigError listing valid names
        for flag, text in (("--model", self.model), ("--tasks", self.tasks)):
            if text is not None:
                normalize_spec(text, flag)  # the form only; importing is the Experiment's
        object.__setattr__(self, "ckpt", tuple(self.ckpt))
        check_device(self.device)
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
        check_amp(self.amp, self.device)
        if self.amp != "off" and self.dtype != "float32":
            raise ConfigError(f"--amp {self.amp} runs float32 weights under autocast; use --dtype float32")
        for name in ("inner_steps", "meta_batch", "meta_steps", "seed"):  # the command line checked the
            if getattr(self, name) is not None:  # tighter bounds unless --allow-huge; these always hold
                check_int(name, getattr(self, name), allow_huge=True)

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
    """A built cell: the learner, its task sampler, and a generator for task batches.

    The model and tasks are the preset's, or the user's (``spec.model``/``spec.tasks``,
    :mod:`harness.zoo.user`); the preset gives the sizes either way."""

    def __init__(self, spec: RunSpec, variant: Variant | None = None, task_overrides: dict | None = None,
                 model_overrides: dict | None = None) -> None:
        self.spec = spec
        self.variant = variant or spec.variant_obj
        r = spec.resolved()
        self.sizes = r
        self.device = torch.device(spec.device)
        self.task = make_tasks(spec.preset_obj, spec.tasks, task_overrides)
        torch.manual_seed(spec.seed)
        model = make_model(spec.preset_obj, spec.model, model_overrides).to(self.device, spec.torch_dtype)
        cfg = self.variant.config(inner_steps=r["inner_steps"], inner_lr=r["inner_lr"], adapt_last=r["adapt_last"],
                                  amp=spec.amp, ckpt_modules=spec.ckpt)
        self.learner = MetaLearner(model, cfg, self.task.loss_fn).to(self.device)
        self.gen = torch.Generator().manual_seed(spec.seed + 1)

    def sample(self, gen: torch.Generator | None = None) -> list[Task]:
        """A meta-batch from the experiment's task stream (or from ``gen``, e.g. a copy of it)."""
        tasks = self.task.sample(self.sizes["meta_batch"], self.gen if gen is None else gen)
        return [t.to(self.device, self.spec.torch_dtype) for t in tasks]

    def reference_learner(self, amp: str | None = None) -> MetaLearner:
        """The same model, LRs and loss without checkpointing (and optionally another precision).

        Shared, not copied: a hook or a closure in the model that reads its own module (``self``) reads the
        same tensors in the reference; a deep copy would leave it reading the original's.  Buffers the
        reference updates are the learner's: :func:`check_agreement` restores them between computations.
        """
        cfg = replace(self.learner.cfg.reference(), amp=self.learner.cfg.amp if amp is None else amp)
        ref = MetaLearner(self.learner.model, cfg, self.learner.loss_fn)
        ref.lrs = self.learner.lrs
        return ref

    def new_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.spec.amp == "fp16" else None


def unscaled_meta_gradients(learner: MetaLearner, tasks: list[Task], scale: float | None = None) -> dict[str, torch.Tensor]:
    """Meta-gradients of the unscaled loss; fp16 takes them on the loss times ``scale`` (default GradScaler's
    initial 2**16), then divides; other precisions ignore ``scale``."""
    scale = (2.0 ** 16 if scale is None else scale) if learner.cfg.amp == "fp16" else 1.0
    grads, _ = learner.meta_gradients(tasks, loss_scale=scale)
    return {k: g / scale for k, g in grads.items()} if scale != 1.0 else grads


def check_agreement(exp: Experiment, tasks: list[Task], learner: Any = None) -> dict[str, float | None]:
    """Meta-gradients of ``learner`` (default ``exp.learner``; a peer works too) vs the non-checkpointed
    reference of ``exp``, on the same weights and tasks.

    Every computation starts from the same buffers and random state (the global generators and the model's
    own), so running statistics, dropout and a layer's own noise are the same in each, and the cell's state
    is left as found.  Under mixed
    precision the learner is also compared with the fp32 non-checkpointed reference (keys prefixed ``fp32_``).
    """
    learner = exp.learner if learner is None else learner
    buffers = {n: b.clone() for n, b in exp.learner.named_buffers()}
    start = capture_rng(list(exp.learner.parameters()), owned_generators(exp.learner.model))

    def from_start(run: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # the running statistics as found, for every computation and at the end
            for n, b in exp.learner.named_buffers():
                b.copy_(buffers[n])
        with replay_rng(start):
            return unscaled_meta_gradients(run, tasks)

    refs = {"": exp.reference_learner()}
    if exp.learner.cfg.amp != "off":
        refs["fp32_"] = exp.reference_learner(amp="off")
    grads = from_start(learner)
    out: dict[str, float | None] = {}
    for prefix, ref in refs.items():
        out.update({prefix + k: v for k, v in agreement(grads, from_start(ref)).items()})
    with torch.no_grad():
        for n, b in exp.learner.named_buffers():
            b.copy_(buffers[n])
    return out


@dataclass
class TrainLog:
    losses: list[float]
    skipped_steps: int = 0  # fp16: meta-steps skipped by the GradScaler (inf/NaN gradients)


MAX_CONSECUTIVE_SKIPS = 50


def meta_step(learner: Any, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
              tasks: list[Task]) -> tuple[float, bool]:
    """One outer step of any learner with ``step(tasks, loss_scale)``; returns (mean query loss, skipped).

    With an fp16 GradScaler the step may be skipped (inf/NaN gradients), exactly as ``scaler.step`` does.
    Under torchrun (:func:`harness.distributed.session`) this rank takes its share of ``tasks`` and the
    meta-gradients and loss are the task-weighted means over all ranks, as one process would compute.
    """
    group = distributed.current()
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss = float(learner.step(tasks)) if group is None else group.step(learner, tasks)[0]
        opt.step()
        return loss, False
    device = next(iter(learner.parameters())).device
    scale = scaler.scale(torch.ones((), device=device)).item()  # also initialises the scaler's state
    if group is None:
        loss = float(learner.step(tasks, loss_scale=scale))
        finite = all(torch.isfinite(p.grad).all() for p in learner.parameters() if p.grad is not None)
    else:
        loss, nonfinite = group.step(learner, tasks, scale)  # every rank agrees on skipping
        finite = not nonfinite
    scaler.step(opt)  # unscales, and skips the update when any gradient is inf/NaN
    scaler.update()
    return loss, not finite


@dataclass
class DivergenceCheck:
    """NaN/inf meta-loss stops a run; under a GradScaler only a long run of skipped steps does."""

    uses_scaler: bool
    skipped_steps: int = 0
    consecutive: int = 0

    def __call__(self, step: int, loss: float, skipped: bool) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.skipped_steps += skipped
        if (not self.uses_scaler and not math.isfinite(loss)) or self.consecutive > MAX_CONSECUTIVE_SKIPS:
            raise Diverged(f"meta-loss became {loss} at meta-step {step}")


def train(exp: Experiment, meta_steps: int, on_step: Callable[[int, float], None] | None = None) -> TrainLog:
    """Meta-train with Adam over the initial weights and LRs; returns the query loss per step."""
    group = distributed.current()
    if group is not None:  # every rank starts from rank 0's initial weights and LRs
        group.broadcast_module(exp.learner)
    opt = torch.optim.Adam(exp.learner.parameters(), lr=exp.sizes["outer_lr"])
    scaler = exp.new_scaler()
    check, log = DivergenceCheck(scaler is not None), TrainLog([])
    for step in range(meta_steps):
        loss, skipped = meta_step(exp.learner, opt, scaler, exp.sample())
        check(step, loss, skipped)
        log.skipped_steps = check.skipped_steps
        log.losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return log
