"""The functional MAML engine: where variant flags become behaviour, in one place.

Fast weights are an explicit ``dict[str, Tensor]`` bound with
``torch.func.functional_call``; inner gradients come from
``torch.autograd.grad(..., create_graph=not first_order)``.  Nothing here
reads or writes ``.grad`` or calls ``.backward()``: that is the whole fix for
the seed's version-counter error (its inner loop wrote fast weights into
``_parameters`` and read ``param.grad``, which the outer backward then found
modified).

The four axes, all composable:

* ``first_order`` -- inner gradients are constants (FOMAML), but the outer
  gradient still reaches the initial weights through ``w - lr * g`` and the
  learnable LRs through ``lr * g``.
* ``learn_lr`` -- softplus-parameterised inner LRs (:class:`InnerLRs`),
  per layer (default, as the seed), per parameter tensor or per element
  (Meta-SGD), optionally per inner step (MAML++ LSLR).
* ``layer_ckpt`` -- :func:`harness.checkpoint` calls inside the model become
  non-reentrant checkpoints with the fast weights as explicit inputs.
* ``step_ckpt`` -- every segment of ``step_ckpt`` inner steps (forward,
  ``autograd.grad``, update) runs inside one segment checkpoint
  (:func:`harness.core.segment.checkpoint_segment`): values only in the forward, the
  full graph rebuilt in the outer backward, so only the segment's input
  weights are kept.  ``step_rebuild="step"`` rebuilds a segment one step at a time, ``snapshots=s`` runs
  a binomial schedule over all K steps (:mod:`harness.core.scheduled`).

Beside ``first_order``, ``estimator`` picks an approximate meta-gradient (truncated, implicit, reptile):
:mod:`harness.core.estimators` says what each computes.

Library use, in one's own loop::

    learner = MetaLearner(model, MetaConfig(inner_steps=2, learn_lr=True, layer_ckpt=True), loss_fn)
    opt = torch.optim.Adam(learner.parameters(), 1e-3)
    loss = learner.step(tasks)          # per-task outer backward, fills .grad
    opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.binding import call_with, refuse_meta_device
from harness.core.ckpt import matching_modules, modules_checkpointed
from harness.core.config import AMP_MODES, PATH_FREE_ESTIMATORS, LossFn, MetaConfig, Task, Weights
from harness.core.estimators import path_free_meta_gradients, second_order_step
from harness.core.recompute import bound_forward, owned_generators
from harness.core.scheduled import checkpoint_schedule
from harness.core.segment import checkpoint_segment
from harness.core.update import sgd_update, step_lr
from harness.core.vectorized import vectorized_meta_gradients

__all__ = ["InnerLRs", "MetaLearner", "OuterLoop", "adapted_names", "inv_softplus", "lr_key", "owner"]


def owner(name: str) -> str:
    """The module path that owns parameter ``name`` ('' for the root)."""
    return name.rpartition(".")[0]


def adapted_names(model: nn.Module, adapt_last: int | None) -> list[str]:
    """Parameters adapted in the inner loop: all, or those of the last N owning modules."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if adapt_last is None:
        return names
    owners: list[str] = []
    for n in names:
        if owner(n) not in owners:
            owners.append(owner(n))
    keep = set(owners[-adapt_last:])
    return [n for n in names if owner(n) in keep]


_ESCAPES = (("%", "%25"), (":", "%3A"), ("<", "%3C"), (".", ":"))


def lr_key(group: str) -> str:
    """The ``InnerLRs.raw`` key of an LR group (a module path or a parameter name), one-to-one.

    ``.`` becomes ``:`` (a ParameterDict key cannot hold a dot) after ``%``, ``:`` and ``<`` are
    percent-escaped, so ``a.b`` -> ``a:b`` and ``a__b`` -> ``a__b`` stay apart; the root module is ``<root>``.
    """
    if group == "":
        return "<root>"
    for char, escaped in _ESCAPES:
        group = group.replace(char, escaped)
    return group


def inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class InnerLRs(nn.Module):
    """Learnable inner learning rates, ``softplus(raw)``, initialised to ``inner_lr``.

    Granularity ``layer`` groups parameters by owning module (the seed's
    ``inner_lrs[idx]`` per module), ``tensor`` gives one per parameter tensor,
    ``element`` one per weight entry (Meta-SGD); ``per_step`` adds a leading
    inner-step axis (MAML++ LSLR).

    The mapping is public: ``key_for(name)`` is the ``raw`` key (meta-gradient ``lr.<key>``) of
    parameter ``name``, ``names_of(key)`` the parameters sharing that LR, ``lr_for(name)`` its
    current value (``softplus``; all steps if per-step).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], cfg: MetaConfig) -> None:
        super().__init__()
        self.granularity, self.per_step = cfg.lr_granularity, cfg.lr_per_step
        shapes = dict(model.named_parameters())
        steps = (max(cfg.inner_steps, 1),) if cfg.lr_per_step else ()
        self._key: dict[str, str] = {}
        self._names: dict[str, list[str]] = {}
        raw: dict[str, nn.Parameter] = {}
        init = inv_softplus(cfg.inner_lr)
        for n in names:
            key = lr_key(owner(n) if cfg.lr_granularity == "layer" else n)
            self._key[n] = key
            self._names.setdefault(key, []).append(n)
            if key not in raw:
                p = shapes[n]
                shape = steps + (tuple(p.shape) if cfg.lr_granularity == "element" else ())
                # real even for a complex parameter: a step size, and softplus is defined on the reals
                raw[key] = nn.Parameter(torch.full(shape, init, dtype=p.real.dtype, device=p.device))
        self.raw = nn.ParameterDict(raw)

    def key_for(self, name: str) -> str:
        """The ``raw`` key of parameter ``name``'s LR (its meta-gradient is ``lr.<key>``)."""
        return self._key[name]

    def names_of(self, key: str) -> list[str]:
        """The parameters that share the LR ``raw[key]``, in ``named_parameters`` order."""
        return list(self._names[key])

    def lr_for(self, name: str, step: int | None = None) -> Tensor:
        """Parameter ``name``'s current LR, ``softplus(raw)`` (at inner step ``step`` if per-step)."""
        lr = F.softplus(self.raw[self._key[name]])
        return lr[step] if (self.per_step and step is not None) else lr

    def values(self) -> dict[str, Tensor]:
        """softplus of every raw LR, once per meta-step (explicit inputs for step checkpoints)."""
        return {k: F.softplus(v) for k, v in self.raw.items()}

    def lookup(self, lrs: Mapping[str, Tensor], name: str, step: int) -> Tensor:
        """Parameter ``name``'s LR at inner step ``step``, from ``values()``."""
        lr = lrs[self._key[name]]
        return lr[step] if self.per_step else lr


def _accumulate(total: dict[str, Tensor | None], params: Mapping[str, Tensor], owned: set[int],
                grads: Sequence[Tensor | None]) -> None:
    """Add one task's ``grads`` into ``total`` in place; the caller's reference to ``grads`` is its last.

    A key's first gradient becomes its sum itself (as ``AccumulateGrad`` steals a fresh gradient into
    ``.grad``) when the sum may own it: not a view, no storage beyond its own elements, the strides of its
    parameter, and a storage no other sum holds (``owned``).  Otherwise the sum is ``zeros_like(p) + g``,
    as before.  Either way every later gradient is added in place, so the sums are those of
    ``zeros_like(p) + g1 + g2 + ...`` (bit for bit, up to the sign of a zero) and own their storage.
    """
    for (k, p), g in zip(params.items(), grads):
        if g is None:
            continue
        if total[k] is not None:
            total[k].add_(g)
            continue
        storage = g.untyped_storage()
        if (g._base is None and not g.requires_grad and g.numel() > 0 and g.storage_offset() == 0
                and storage.nbytes() == g.numel() * g.element_size() and g.stride() == p.stride()
                and storage.data_ptr() not in owned):
            owned.add(storage.data_ptr())
            total[k] = g
        else:
            total[k] = torch.zeros_like(p).add_(g)


class OuterLoop:
    """Outer-loop plumbing shared by :class:`MetaLearner` and the peers (``harness.peers``).

    Subclasses provide ``meta_parameters()`` and ``task_loss(task, loss_scale)``.
    """

    def meta_parameters(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def task_loss(self, task: Task, loss_scale: float = 1.0) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta_gradients(self, tasks: Iterable[Task], loss_scale: float = 1.0) -> tuple[dict[str, Tensor], float]:
        """Mean-over-tasks meta-gradients (one outer backward per task, to bound memory) and mean query loss.

        Uses ``torch.autograd.grad`` so nothing is accumulated into ``.grad``.  With a
        ``loss_scale`` (fp16) the returned gradients are those of the *scaled* loss,
        ready for ``GradScaler.step``; divide by the scale to compare them.

        Memory: the sum holds one copy of the meta-parameters, as ``.backward()`` into ``.grad`` does.
        It takes the first task's gradients themselves (:func:`_accumulate`), so nothing weight-sized is
        allocated before the first backward, and no task's gradients outlive their addition into the sum
        (they would otherwise be a second copy during the next task's backward, the peak).
        """
        params = self.meta_parameters()
        total: dict[str, Tensor | None] = dict.fromkeys(params)
        owned: set[int] = set()
        losses: list[float] = []
        tasks = list(tasks)
        for task in tasks:
            loss = self.task_loss(task, loss_scale) / len(tasks)
            _accumulate(total, params, owned, torch.autograd.grad(
                loss * loss_scale if loss_scale != 1.0 else loss, list(params.values()), allow_unused=True))
            losses.append(loss.detach().item() * len(tasks))
            del loss  # its graph nodes (their saved tensors are already freed) do not wait for the next task
        out = {k: torch.zeros_like(p) if total[k] is None else total[k] for k, p in params.items()}
        return out, sum(losses) / len(losses)

    def step(self, tasks: Iterable[Task], loss_scale: float = 1.0) -> float:
        """Fill ``.grad`` of the meta-parameters for one outer step; returns the mean query loss.

        With fp16, pass the GradScaler's current scale and finish with ``scaler.step(opt); scaler.update()``
        (``harness.loop.train.meta_step`` does exactly that).
        """
        grads, loss = self.meta_gradients(tasks, loss_scale)
        for (k, p), g in zip(self.meta_parameters().items(), grads.values()):
            p.grad = g if p.grad is None else p.grad + g
        return loss


class MetaLearner(OuterLoop, nn.Module):
    """Initial weights (the model) + learnable LRs, and the functional inner/outer loop."""

    def __init__(self, model: nn.Module, cfg: MetaConfig, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        refuse_meta_device(model)
        self.adapted = adapted_names(model, cfg.adapt_last)
        self.ckpt_modules = matching_modules(model, cfg.ckpt_modules) if cfg.ckpt_modules else []
        self.lrs = InnerLRs(model, self.adapted, cfg) if cfg.learn_lr else None
        self.last_cg_residual: float | None = None  # implicit: the last meta_gradients' CG residual

    # -- pieces -------------------------------------------------------------
    def initial_weights(self) -> Weights:
        return dict(self.model.named_parameters())

    def forward_with(self, weights: Mapping[str, Tensor], x: Tensor, *,
                     buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """The model's forward with ``weights`` (and ``buffers``, if given) bound.  Every checkpoint in it
        (``harness.checkpoint``, torch's own, the ``ckpt_modules``) is a plain call, or under ``layer_ckpt`` a
        region whose recomputation reads what this forward read (:mod:`harness.core.recompute`).  A step
        checkpoint's recomputation binds clones of the buffers as they were before its forward."""
        bound: dict[str, Tensor] = dict(weights)
        if buffers is not None:
            bound.update(buffers)
        ckpt = self.cfg.layer_ckpt
        with bound_forward(self.model, ckpt), modules_checkpointed(self.model, self.ckpt_modules if ckpt else []):
            return call_with(self.model, bound, (x,))

    def loss_with(self, weights: Mapping[str, Tensor], x: Tensor, y: Tensor, *,
                  buffers: Mapping[str, Tensor] | None = None) -> Tensor:
        """Forward and loss under the configured autocast (checkpoint recomputation replays it)."""
        amp_dtype = AMP_MODES[self.cfg.amp]
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return self.loss_fn(self.forward_with(weights, x, buffers=buffers), y)

    def lr_values(self) -> dict[str, Tensor] | None:
        return self.lrs.values() if self.lrs is not None else None

    def lr_of(self, name: str, step: int | None = None) -> Tensor | float:
        """The inner LR parameter ``name`` is updated with (learnable: ``lrs.lr_for``; else ``inner_lr``)."""
        return self.lrs.lr_for(name, step) if self.lrs is not None else self.cfg.inner_lr

    def inner_loop(self, weights: Weights, lrs: Mapping[str, Tensor] | None, x: Tensor, y: Tensor,
                     steps: range, *, loss_scale: float = 1.0, buffers: Mapping[str, Tensor] | None = None,
                     build_graph: bool = True) -> Weights:
        """Plain SGD on the support set for ``steps``; the one place the update rule lives.

        With a loss scale (fp16), the inner gradient is taken on the scaled loss and
        unscaled by hand (PyTorch's gradient-penalty recipe for GradScaler).  ``build_graph=False``
        computes the values only (the forward of a step checkpoint).  A parameter the loss does not
        depend on has a zero inner gradient.
        """
        for k in steps:
            loss = self.loss_with(weights, x, y, buffers=buffers)
            adapted = [weights[n] for n in self.adapted]
            grads = torch.autograd.grad(loss * loss_scale if loss_scale != 1.0 else loss, adapted, allow_unused=True,
                                        create_graph=build_graph and second_order_step(self.cfg, k), materialize_grads=True)
            if loss_scale != 1.0:
                grads = tuple(g / loss_scale for g in grads)
            weights = sgd_update(weights, dict(zip(self.adapted, grads)),
                                 lambda n, k=k: step_lr(self.lrs, lrs, n, k, self.cfg.inner_lr))
        return weights

    def adapt(self, support_x: Tensor, support_y: Tensor, weights: Weights | None = None,
              lrs: Mapping[str, Tensor] | None = None, loss_scale: float = 1.0) -> Weights:
        """K inner steps from ``weights`` (default: the initial weights); returns fast weights.

        Under step checkpointing each segment snapshots the buffers before its forward; its
        recomputation runs on a clone of that snapshot (the segment replays the RNG state).
        """
        weights = self.initial_weights() if weights is None else dict(weights)
        lrs = self.lr_values() if lrs is None else lrs
        K, seg = self.cfg.inner_steps, self.cfg.step_ckpt
        if K and (self.cfg.snapshots or (seg and self.cfg.step_rebuild == "step")):
            return checkpoint_schedule(self, weights, lrs, support_x, support_y, loss_scale)
        if seg == 0 or K == 0:
            return self.inner_loop(weights, lrs, support_x, support_y, range(K), loss_scale=loss_scale)
        names = list(weights)
        lr_keys = list(lrs) if lrs is not None else []
        for start in range(0, K, seg):
            steps = range(start, min(start + seg, K))
            snapshot = {n: b.clone() for n, b in self.model.named_buffers()}

            def segment(*flat: Tensor, recompute: bool, build_graph: bool, steps: range = steps,
                        snapshot: dict[str, Tensor] = snapshot) -> tuple[Tensor, ...]:
                w = dict(zip(names, flat[: len(names)]))
                lr = dict(zip(lr_keys, flat[len(names):])) if lr_keys else None
                buffers = {n: b.clone() for n, b in snapshot.items()} if recompute else None
                out = self.inner_loop(w, lr, support_x, support_y, steps, loss_scale=loss_scale,
                                        buffers=buffers, build_graph=build_graph)
                return tuple(out[n] for n in names)

            flat_in = [weights[n] for n in names] + [lrs[k] for k in lr_keys]
            weights = dict(zip(names, checkpoint_segment(segment, *flat_in, generators=owned_generators(self.model))))
        return weights

    def task_loss(self, task: Task, loss_scale: float = 1.0) -> Tensor:
        """Query loss after adapting on the support set: one task's meta-loss."""
        fast = self.adapt(task.support_x, task.support_y, lrs=self.lr_values(), loss_scale=loss_scale)
        return self.loss_with(fast, task.query_x, task.query_y)

    def meta_gradients(self, tasks: Iterable[Task], loss_scale: float = 1.0) -> tuple[dict[str, Tensor], float]:
        """Task after task (:class:`OuterLoop`), or all tasks at once under ``cfg.vectorize``; implicit and
        reptile by :func:`path_free_meta_gradients` (the CG residual of implicit: ``last_cg_residual``)."""
        if self.cfg.estimator in PATH_FREE_ESTIMATORS:
            grads, loss, self.last_cg_residual = path_free_meta_gradients(self, list(tasks))
            return grads, loss
        if self.cfg.vectorize:
            return vectorized_meta_gradients(self, list(tasks), loss_scale)
        return super().meta_gradients(tasks, loss_scale)

    def meta_parameters(self) -> dict[str, Tensor]:
        """What the outer step updates: initial weights, then ``lr.<key>`` for learnable LRs."""
        out = {f"w.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.lrs is not None:
            out.update({f"lr.{k}": p for k, p in self.lrs.raw.items()})
        return out


