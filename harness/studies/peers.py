"""Peers: the same MAML meta-step written with ``higher`` (0.2.1) and ``torchopt`` (0.7.3).

A peer is what a user would run instead of this harness.  :func:`build_peer`
returns an object with the measurement interface of
:class:`~harness.core.engine.MetaLearner` -- ``meta_gradients(tasks)``,
``step(tasks)``, ``parameters()`` -- that shares the initial weights, the
learnable LRs and the BatchNorm buffers of ``exp.learner``, so a peer cell
and our cell start from the same state and their meta-gradients carry the
same keys (``w.<name>``, ``lr.<key>``).  Both peers need the optional extra
``pip install .[peers]``; they are imported lazily.

What each peer can express (:func:`supports` says why not, per cell):

* ``higher`` -- ``innerloop_ctx(model, SGD, copy_initial_weights=False,
  track_higher_grads=True)``.  Second order as is.  First order (FOMAML:
  inner gradients are constants, the outer gradient still reaches the initial
  weights through ``w - lr * g`` and the LRs through ``lr * g``) via the
  differentiable optimiser's ``grad_callback`` that detaches the inner
  gradients.  (``track_higher_grads=False`` is *not* FOMAML: it detaches the
  fast weights themselves, so no gradient reaches the initial weights.)
  Learnable inner LRs through ``override={'lr': [...]}`` with one parameter
  group per adapted tensor, fed ``softplus(raw)`` from the learner's
  :class:`~harness.core.engine.InnerLRs` -- any granularity (layer, tensor,
  element), and per-step LRs by overriding at every ``diffopt.step``.
  higher clones the buffers on entry and updates only its copies; the
  adapter copies them back after each task, so BatchNorm running statistics
  evolve as under the engine.  No gradient checkpointing.
* ``torchopt`` -- the functional API: ``torchopt.sgd(lr)`` as a
  ``GradientTransformation``; second order through
  ``torchopt.FuncOptimizer.step`` (which differentiates with
  ``create_graph=True``), first order through ``impl.update`` on inner
  gradients taken without a graph, then ``torchopt.apply_updates(...,
  inplace=False)``.  The model runs with the fast weights bound by
  ``torch.func.functional_call`` on the real module (buffers updated in place,
  as with the engine).  Fixed inner LR only: ``torchopt.sgd`` takes one
  scalar LR (float or schedule) per transformation, so there is no per-layer
  learnable LR.  No gradient checkpointing.

Mixed precision: neither peer has an AMP mode of its own.  A bf16 cell
wraps each forward and loss in ``torch.autocast`` exactly as the engine does
(what a user of the peer would write).  fp16 needs the inner loss scaled and
the inner gradients unscaled inside the peer's own ``autograd.grad`` call
(higher: a ``grad_callback``; torchopt: a custom transformation); that is not
wired here, so fp16 peer cells are listed unsupported.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from harness.core.ckpt import layer_checkpointing
from harness.core.config import AMP_MODES, ConfigError, MetaConfig, Task
from harness.core.engine import MetaLearner, OuterLoop

if TYPE_CHECKING:  # pragma: no cover
    from harness.train import Experiment
    from harness.variants import Variant

PEERS = ("higher", "torchopt")
VERSIONS = {"higher": "0.2.1", "torchopt": "0.7.3"}
NO_CKPT = "no gradient checkpointing"
NO_VECTORIZE = "no vectorized tasks (the adapter loops over the meta-batch's tasks one at a time)"
NO_LEARN_LR = "no learnable inner LR (torchopt.sgd takes one fixed scalar LR per transformation)"
NO_FP16 = ("fp16 loss scaling through the peer's inner loop is not wired (higher could via grad_callback, "
           "torchopt via a custom transformation); bf16 autocast only")


def _check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise ConfigError(f"unknown peer {peer!r}; valid peers: {', '.join(PEERS)}")


def available(peer: str) -> tuple[bool, str]:
    """Is the peer's package importable?  ``(False, reason)`` names the extra to install."""
    _check_peer(peer)
    try:
        importlib.import_module(peer)
    except Exception as exc:  # ImportError, or a peer that breaks on this torch
        return False, f"{peer} is not importable ({type(exc).__name__}: {exc}); pip install '.[peers]'"
    return True, ""


def supports(peer: str, variant: "Variant", amp: str = "off") -> tuple[bool, str]:
    """Can ``peer`` express ``variant`` (under precision ``amp``) exactly?  ``(False, reason)`` when not."""
    _check_peer(peer)
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown precision {amp!r}; valid choices: {', '.join(AMP_MODES)}")
    if variant.layer_ckpt or variant.step_ckpt:
        return False, NO_CKPT
    if getattr(variant, "vectorize", False):
        return False, NO_VECTORIZE
    if peer == "torchopt" and (variant.learn_lr or variant.lr_per_step):
        return False, NO_LEARN_LR
    if amp == "fp16":
        return False, NO_FP16
    return True, ""


def cell_name(peer: str, variant: "Variant | str") -> str:
    """``higher:<variant>`` / ``torchopt:<variant>``."""
    _check_peer(peer)
    return f"{peer}:{variant if isinstance(variant, str) else variant.name}"


def cells(variants: Iterable["Variant"], amp: str = "off") -> list[dict[str, object]]:
    """Every (peer, variant) cell with ``supported`` and ``reason``; unsupported ones are listed, not dropped."""
    out = []
    for v in variants:
        for peer in PEERS:
            ok, reason = supports(peer, v, amp)
            if ok:
                present, why = available(peer)
                if not present:
                    ok, reason = False, why
            out.append({"cell": cell_name(peer, v), "peer": peer, "variant": v.name,
                        "supported": ok, "reason": reason})
    return out


class _Peer(OuterLoop, nn.Module):
    """Shared plumbing: the meta-parameters are those of the reference learner (shared, not copied)."""

    name = ""

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__()
        self.learner = learner  # registered submodule: parameters() are the learner's own tensors
        self.cfg = cfg
        self.model, self.loss_fn, self.adapted = learner.model, learner.loss_fn, learner.adapted

    def meta_parameters(self) -> dict[str, Tensor]:
        return self.learner.meta_parameters()

    def _lr_values(self) -> dict[str, Tensor] | None:
        return self.learner.lrs.values() if (self.cfg.learn_lr and self.learner.lrs is not None) else None

    def _task_loss(self, task: Task) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss(self, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Forward and loss under the cell's autocast (bf16), as a user of the peer would wrap them."""
        amp_dtype = AMP_MODES[self.cfg.amp]
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return self.loss_fn(forward(x), y)

    def task_loss(self, task: Task, loss_scale: float = 1.0) -> Tensor:
        if loss_scale != 1.0:
            raise ConfigError(f"{self.name}: {NO_FP16}")
        with layer_checkpointing(False):  # harness.checkpoint in the models: plain calls for peers
            return self._task_loss(task)


def _detach_all(grads: Iterable[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else g.detach() for g in grads]


class HigherPeer(_Peer):
    """MAML with ``higher.innerloop_ctx``: SGD, one parameter group per adapted tensor."""

    name = "higher"

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__(learner, cfg)
        self._higher = importlib.import_module("higher")

    def _override(self, lrs: Mapping[str, Tensor] | None, k: int) -> dict[str, list] | None:
        if lrs is None:
            return None
        assert self.learner.lrs is not None
        return {"lr": [self.learner.lrs.lookup(lrs, n, k) for n in self.adapted]}

    def _task_loss(self, task: Task) -> Tensor:
        named = dict(self.model.named_parameters())
        opt = torch.optim.SGD([{"params": [named[n]]} for n in self.adapted], lr=self.cfg.inner_lr)
        lrs = self._lr_values()
        per_step = lrs is not None and self.learner.lrs is not None and self.learner.lrs.per_step
        callback = _detach_all if self.cfg.first_order else None
        with self._higher.innerloop_ctx(self.model, opt, copy_initial_weights=False, track_higher_grads=True,
                                        override=self._override(lrs, 0)) as (fmodel, diffopt):
            for k in range(self.cfg.inner_steps):
                support = self._loss(fmodel, task.support_x, task.support_y)
                diffopt.step(support, override=self._override(lrs, k) if per_step else None,
                             grad_callback=callback)
            query = self._loss(fmodel, task.query_x, task.query_y)
            self._write_back_buffers(fmodel)
            return query

    def _write_back_buffers(self, fmodel: nn.Module) -> None:
        """higher runs on private copies of the buffers (``buffer_sync`` clones them on entry); copy the
        updated running statistics back so the model's state evolves exactly as under the engine."""
        theirs = dict(fmodel.named_buffers())
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in theirs and theirs[n] is not b:
                    b.copy_(theirs[n])


class TorchoptPeer(_Peer):
    """MAML with torchopt's functional API: ``torchopt.sgd`` + ``apply_updates`` on a dict of fast weights."""

    name = "torchopt"

    def __init__(self, learner: MetaLearner, cfg: MetaConfig) -> None:
        super().__init__(learner, cfg)
        self._torchopt = importlib.import_module("torchopt")

    def _task_loss(self, task: Task) -> Tensor:
        to = self._torchopt
        weights: dict[str, Tensor] = dict(self.model.named_parameters())
        fast = tuple(weights[n] for n in self.adapted)
        if self.cfg.first_order:
            impl = to.sgd(lr=self.cfg.inner_lr)
            state = impl.init(fast)
        else:
            inner = to.FuncOptimizer(to.sgd(lr=self.cfg.inner_lr), inplace=False)
        for _ in range(self.cfg.inner_steps):
            support = self._loss(self._bind(weights, fast), task.support_x, task.support_y)
            if self.cfg.first_order:
                grads = torch.autograd.grad(support, fast, create_graph=False, allow_unused=True)
                updates, state = impl.update(grads, state, params=fast, inplace=False)
                fast = tuple(to.apply_updates(fast, updates, inplace=False))
            else:
                fast = tuple(inner.step(support, fast))
        return self._loss(self._bind(weights, fast), task.query_x, task.query_y)

    def _bind(self, weights: Mapping[str, Tensor], fast: tuple[Tensor, ...]) -> Callable[[Tensor], Tensor]:
        bound = {**weights, **dict(zip(self.adapted, fast))}
        return lambda x: functional_call(self.model, bound, (x,), strict=False)


_CLASSES = {"higher": HigherPeer, "torchopt": TorchoptPeer}


def build_peer(peer: str, variant: "Variant", exp: "Experiment") -> _Peer:
    """The peer's learner for ``variant``, sharing weights, LRs and buffers with ``exp.learner``.

    Raises :class:`ConfigError` with the reason when the peer cannot express the
    variant or is not installed.
    """
    ok, reason = supports(peer, variant, exp.learner.cfg.amp)
    if not ok:
        raise ConfigError(f"{cell_name(peer, variant)} is unsupported: {reason}")
    present, why = available(peer)
    if not present:
        raise ConfigError(why)
    learner = exp.learner
    if variant.learn_lr and learner.lrs is None:
        raise ConfigError(f"{cell_name(peer, variant)} needs learnable LRs but the reference learner has none")
    if variant.learn_lr and variant.lr_per_step != learner.cfg.lr_per_step:
        raise ConfigError(f"{cell_name(peer, variant)}: lr_per_step={variant.lr_per_step} but the reference "
                          f"learner has lr_per_step={learner.cfg.lr_per_step}")
    cfg = replace(learner.cfg, first_order=variant.first_order, learn_lr=variant.learn_lr,
                  layer_ckpt=False, step_ckpt=0)
    return _CLASSES[peer](learner, cfg)


def peer_agreement(peer: _Peer, exp: "Experiment", tasks: list[Task]) -> dict[str, float | None]:
    """The peer's meta-gradients vs our non-checkpointed reference of ``exp`` (``loop.check_agreement``)."""
    from harness.train import check_agreement

    return check_agreement(exp, tasks, peer)
