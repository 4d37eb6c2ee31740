"""The seed report's stateful MAML, rebuilt in this project's style, to reproduce its failures.

This engine is **deliberately wrong**: it exists so ``python -m harness
diagnose`` can show what goes wrong and why (see ``docs/diagnosis.md``).  Use
:class:`harness.core.engine.MetaLearner` for real work.

What it does, like the report:

* a deep copy of the model holds the fast weights;
* every inner step calls ``loss.backward(create_graph=not first_order)`` and
  reads the inner gradient from ``param.grad``;
* the update ``param - lr * param.grad`` is written back into the owning
  module's ``_parameters`` (and ``retain_grad()``-ed, so the next step's
  ``.backward()`` fills its ``.grad``);
* the learnable LRs are one raw parameter per adapted module, applied as
  ``softplus(raw) * param.grad``;
* gradient hooks on the copy's parameters copy the outer gradient to the
  original model's ``.grad`` during the outer backward;
* the model checkpoints its layers inside ``forward`` with
  ``torch.utils.checkpoint.checkpoint(block, x)`` -- reentrant (the report's
  behaviour) or non-reentrant, per :class:`SeedConfig`.

One deliberate difference from the report: the report only calls
``retain_grad()`` on fast weights in second-order mode.  With two or more inner
steps its first-order mode would then find ``param.grad is None`` at the
second step (the fast weights are non-leaf tensors) and stop with a
``TypeError`` before reaching the failures the user asks about, so this engine
retains the gradient in both orders.  Nothing else changes.

Mixed precision (``SeedConfig.amp``), the report's GradScaler path: ``fp16`` or
``bf16`` autocast around every forward and loss (the report's ``with
autocast(enabled=half)`` at the call sites) and around the update (its
``mml_inner``); for ``fp16`` a ``torch.amp.GradScaler``: the inner loss is
``scaler.scale(loss)`` before ``backward(create_graph=...)``, the update is
``lr * (1 / scaler.get_scale()) * param.grad``, the outer backward is
``scaler.scale(outer_loss).backward()`` and ``scaler.unscale_(opt)`` (as in
``mml_outer_step``) unscales the meta-gradients, so they come back as gradients
of the unscaled loss and compare with other engines.  The model and data must be
float32 (autocast does not apply to float64).

Meta-gradients come back in :meth:`harness.core.engine.MetaLearner.meta_gradients`'s
naming (``w.<param>``, ``lr.<key>`` with the per-layer key of
:class:`harness.core.engine.InnerLRs`) so :func:`harness.core.engine.agreement` compares
them with the functional engine.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch import Tensor, nn

from harness.core.ckpt import checkpoint as harness_checkpoint
from harness.core.config import AMP_MODES, Task
from harness.core.engine import inv_softplus, owner
from harness.core.engine import lr_key as engine_lr_key

__all__ = ["CKPT_MODES", "SeedConfig", "SeedLearner", "SeedModel", "adapted_modules", "lr_key"]

LossFn = Callable[[Tensor, Tensor], Tensor]
CKPT_MODES = ("off", "reentrant", "non_reentrant", "harness")


class SeedModel(nn.Module):
    """A small residual-free MLP shaped like the report's model: an embedding, checkpointed blocks, a head.

    ``ckpt`` picks what the blocks are wrapped in:

    * ``off`` -- plain calls;
    * ``reentrant`` -- ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)`` (the report);
    * ``non_reentrant`` -- the same with ``use_reentrant=False``;
    * ``harness`` -- :func:`harness.checkpoint`, the correct drop-in the functional engine switches.

    The embedding is not checkpointed: a reentrant checkpoint whose only input is
    the data (no ``requires_grad``) would return an output without a graph.
    """

    def __init__(self, in_dim: int = 1, width: int = 16, depth: int = 2, out_dim: int = 1, ckpt: str = "off") -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, out_dim)
        self.ckpt = ckpt

    @property
    def ckpt(self) -> str:
        return self._ckpt

    @ckpt.setter
    def ckpt(self, mode: str) -> None:
        if mode not in CKPT_MODES:
            raise ValueError(f"ckpt must be one of {', '.join(CKPT_MODES)}; got {mode!r}")
        self._ckpt = mode

    def _call(self, block: nn.Module, x: Tensor) -> Tensor:
        if self._ckpt == "reentrant":
            return tuc.checkpoint(block, x, use_reentrant=True)
        if self._ckpt == "non_reentrant":
            return tuc.checkpoint(block, x, use_reentrant=False)
        if self._ckpt == "harness":
            return harness_checkpoint(block, x)
        return block(x)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.embed(x))
        for block in self.blocks:
            x = self._call(block, x)
        return self.head(x)


@dataclass(frozen=True)
class SeedConfig:
    inner_steps: int = 2
    inner_lr: float = 0.1
    first_order: bool = False
    learn_lr: bool = False
    layer_ckpt: bool = False
    reentrant: bool = True  # the report's torch.utils.checkpoint default
    amp: str = "off"  # off | fp16 (autocast + GradScaler, the report's `half`) | bf16 (autocast only)
    init_scale: float = 2.0 ** 16  # fp16: the GradScaler's initial scale (torch's default)

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown precision {self.amp!r}; valid choices: {', '.join(AMP_MODES)}")

    @property
    def ckpt_mode(self) -> str:
        if not self.layer_ckpt:
            return "off"
        return "reentrant" if self.reentrant else "non_reentrant"


def lr_key(module_path: str) -> str:
    """The per-layer LR key of :class:`harness.core.engine.InnerLRs` for a module path."""
    return engine_lr_key(module_path)


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in ``named_parameters`` order (the report's ``mml_modules``)."""
    seen: dict[str, nn.Module] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        if p.requires_grad:
            seen.setdefault(owner(name), modules[owner(name)])
    return list(seen.items())


class SeedLearner:
    """Initial weights (``model``) + one raw LR per adapted module, and the report's stateful meta-step."""

    def __init__(self, model: nn.Module, cfg: SeedConfig, loss_fn: LossFn) -> None:
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        self.lr_raw: dict[str, nn.Parameter] = {}
        if cfg.learn_lr:
            for path, _ in adapted_modules(model):
                p = next(iter(model.get_submodule(path).parameters()))
                self.lr_raw[lr_key(path)] = nn.Parameter(
                    torch.full((), inv_softplus(cfg.inner_lr), dtype=p.dtype, device=p.device))

    # -- the report's mml_ctx / mml_inner / mml_outer_backward / mml_flush --
    def context(self) -> nn.Module:
        """Deep copy for the fast weights, with hooks routing the outer gradient to the original model."""
        fast = copy.deepcopy(self.model)
        fast.ckpt = self.cfg.ckpt_mode
        fast.seed_propagate = False
        fast.seed_hooks = []
        fast.seed_touched = []
        for p, p_ in zip(self.model.parameters(), fast.parameters()):
            def hook(grad: Tensor, p: Tensor = p) -> None:
                if fast.seed_propagate:
                    p.grad = grad.detach() if p.grad is None else (p.grad + grad).detach()
            fast.seed_hooks.append(p_.register_hook(hook))
        return fast

    def autocast(self, device: torch.device) -> torch.autocast:
        """The report's ``autocast(enabled=half)``, for ``fp16`` or ``bf16``; disabled for ``off``."""
        dtype = AMP_MODES[self.cfg.amp]
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def new_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A fresh GradScaler for ``fp16`` (the report's ``scaler``), else None."""
        if self.cfg.amp != "fp16":
            return None
        return torch.amp.GradScaler(device.type, init_scale=self.cfg.init_scale)

    def inner_step(self, fast: nn.Module, loss: Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
        """``loss.backward``, then fast weights from ``.grad`` written into ``_parameters``.

        With a ``scaler``: ``scaler.scale(loss).backward(...)`` and ``lr * (1/scale) * param.grad``, the
        update under autocast, as the report's ``mml_inner``.
        """
        if scaler is not None:
            loss = scaler.scale(loss)
        loss.backward(create_graph=not self.cfg.first_order)
        fast.seed_touched.extend(fast.parameters())
        grad_scale_inv = 1.0 / scaler.get_scale() if scaler is not None else 1.0
        with self.autocast(loss.device):
            for path, module in adapted_modules(fast):
                params = vars(module)["_parameters"]
                for name, param in params.items():
                    if param is None:
                        continue
                    lr = F.softplus(self.lr_raw[lr_key(path)]) if self.cfg.learn_lr else self.cfg.inner_lr
                    if scaler is not None:
                        update = lr * grad_scale_inv * param.grad  # the report's line, scaled path
                    else:
                        update = lr * param.grad
                    new_param = param - update
                    new_param.retain_grad()  # see the module docstring: the report does this in second order only
                    params[name] = new_param

    def outer_backward(self, fast: nn.Module, loss: Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
        fast.seed_propagate = True
        try:
            (scaler.scale(loss) if scaler is not None else loss).backward()
        finally:
            for h in fast.seed_hooks:
                h.remove()
            for p in fast.seed_touched:
                p.grad = None

    # -- one meta-step -------------------------------------------------------
    def meta_parameters(self) -> dict[str, Tensor]:
        out = {f"w.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        out.update({f"lr.{k}": p for k, p in self.lr_raw.items()})
        return out

    def meta_gradients(self, tasks: Iterable[Task]) -> tuple[dict[str, Tensor], float]:
        """The report's meta-gradients: whatever ends up in ``.grad`` after the per-task outer backwards.

        Under ``fp16`` they are unscaled with ``scaler.unscale_(opt)`` (the report's ``mml_outer_step``,
        minus the clip and the step), so they are gradients of the unscaled loss; a non-finite scaled
        gradient (which would make ``scaler.step`` skip) stays inf/NaN after unscaling.
        """
        params = self.meta_parameters()
        for p in params.values():
            p.grad = None
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_gradients needs at least one task")
        device = tasks[0].support_x.device
        scaler = self.new_scaler(device)
        losses: list[float] = []
        for task in tasks:
            fast = self.context()
            for _ in range(self.cfg.inner_steps):
                with self.autocast(device):
                    inner_loss = self.loss_fn(fast(task.support_x), task.support_y)
                self.inner_step(fast, inner_loss, scaler)
            with self.autocast(device):
                loss = self.loss_fn(fast(task.query_x), task.query_y) / len(tasks)
            self.outer_backward(fast, loss, scaler)
            losses.append(loss.detach().float().item() * len(tasks))
        if scaler is not None:
            opt = torch.optim.SGD([p for p in params.values() if p.grad is not None], lr=0.0)
            scaler.unscale_(opt)  # divides every .grad by the scale, in place
        grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
        for p in params.values():
            p.grad = None
        return grads, sum(losses) / len(losses)
