"""Peers: the same MAML meta-step written with ``higher`` (0.2.1), ``torchopt`` (0.7.3) and ``torch-maml`` (1.0).

A peer is what a user would run instead of this harness.  :func:`build_peer`
returns an object with the measurement interface of
:class:`~harness.core.engine.MetaLearner` -- ``meta_gradients(tasks)``,
``step(tasks)``, ``parameters()`` -- that shares the initial weights, the
learnable LRs and the BatchNorm buffers of ``exp.learner``, so a peer cell
and our cell start from the same state and their meta-gradients carry the
same keys (``w.<name>``, ``lr.<key>``).  All three peers need the optional extra
``pip install .[peers]``; they are imported lazily.  One module per peer (``higher_peer``,
``torchopt_peer``, ``torch_maml_peer``); :mod:`~harness.peers.support` says what each can express.

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

* ``torch_maml`` -- ``NaiveMAML`` and ``GradientCheckpointMAML(checkpoint_steps=n)``
  (reentrant checkpoints around chunks of ``n`` inner steps) with ``IngraphGradientDescent``: second order,
  one fixed inner LR, with or without step checkpoints (a variant's ``step_ckpt``); no first order, no
  learnable per-layer LR, no per-layer checkpointing (see ``torch_maml_peer``).

Mixed precision: no peer has an AMP mode of its own.  A bf16 cell
wraps each forward and loss in ``torch.autocast`` exactly as the engine does
(what a user of the peer would write).  fp16 needs the inner loss scaled and
the inner gradients unscaled inside the peer's own ``autograd.grad`` call
(higher: a ``grad_callback``; torchopt: a custom transformation); that is not
wired here, so fp16 peer cells are listed unsupported.
"""
from __future__ import annotations

from dataclasses import replace

from harness.core.config import ConfigError, Task
from harness.peers.base import Peer
from harness.peers.higher_peer import HigherPeer
from harness.peers.support import (NO_CKPT, NO_ESTIMATOR, NO_FIRST_ORDER, NO_FP16, NO_LAYER_CKPT, NO_LEARN_LR,
                                           NO_LEARN_LR_TORCH_MAML, NO_VECTORIZE, PEERS, VERSIONS, available,
                                           cell_name, cells, supports)
from harness.peers.torch_maml_peer import TorchMamlPeer
from harness.peers.torchopt_peer import TorchoptPeer
from harness.loop.agreement import check_agreement
from harness.loop.spec import Experiment

from harness.variants import Variant

__all__ = ["NO_CKPT", "NO_ESTIMATOR", "NO_FIRST_ORDER", "NO_FP16", "NO_LAYER_CKPT", "NO_LEARN_LR", "NO_LEARN_LR_TORCH_MAML",
           "NO_VECTORIZE", "PEERS", "VERSIONS", "HigherPeer", "Peer", "TorchMamlPeer", "TorchoptPeer", "available",
           "build_peer", "cell_name", "cells", "peer_agreement", "supports"]

_CLASSES = {"higher": HigherPeer, "torchopt": TorchoptPeer, "torch_maml": TorchMamlPeer}


def build_peer(peer: str, variant: "Variant", exp: "Experiment") -> Peer:
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
                  layer_ckpt=False, step_ckpt=learner.cfg.step_ckpt if peer == "torch_maml" else 0, vectorize=False,
                  vmap_chunk=None)
    return _CLASSES[peer](learner, cfg)


def peer_agreement(peer: Peer, exp: "Experiment", tasks: list[Task]) -> dict[str, float | None]:
    """The peer's meta-gradients vs our non-checkpointed reference of ``exp`` (``loop.check_agreement``)."""
    return check_agreement(exp, tasks, peer)
