"""The meta-batch's tasks together: ``torch.func.vmap`` over tasks of a functional inner loop.

Why: every MAML library loops over the tasks of a meta-batch one at a time; for the small models of
few-shot learning that loop is bound by per-operator overhead, not arithmetic.  Here one inner loop
runs on all tasks at once (``vmap`` over the stacked support/query sets), its gradients taken by
``torch.func.grad``; second order is the *nested* transform (the outer ``grad`` differentiates through
the inner ``grad``), first order detaches the inner gradients (the outer gradient still reaches the
initial weights through ``w - lr * g`` and the LRs through ``lr * g``, as in the sequential engine).

The outer gradient is ``torch.func.grad`` over ``(initial weights, raw LRs)`` of the mean query loss
of the vmapped tasks (not vmap-then-``autograd.grad``): the whole meta-gradient is one composed
transform, nothing mixes functorch levels with the tape of the caller, and the returned gradients are
plain tensors keyed like :meth:`MetaLearner.meta_parameters` -- so ``MetaLearner.step`` fills ``.grad``
of the learner's own parameters exactly as the sequential engine does.

``vmap_chunk=n`` bounds memory: the tasks are split into chunks of at most ``n`` and the outer gradient
of each chunk is taken separately and summed (weighted by its share of the meta-batch), so only one
chunk's graph is alive at a time.  (``vmap(chunk_size=n)`` under one outer ``grad`` would keep every
chunk's saved tensors until the outer backward: no memory bound.)  The weights and raw LRs go into
``grad`` detached: the parameters themselves (``requires_grad``) made autograd record every chunk on the
caller's tape too, and the returned gradients held all chunks' graphs to the end of the step (sinusoid,
25 tasks, ``vmaml``: 0.706 MiB at ``n=1`` before, 0.068 after; ``maml`` 0.043; ``n=5``: 0.187).

Refused with a one-line :class:`ConfigError` (see :func:`check_vectorizable`):

* checkpointing (``layer_ckpt``/``step_ckpt``): non-reentrant checkpointing fails under ``torch.func``
  transforms ("don't yet support saved tensor hooks") and the segment checkpoint is an
  ``autograd.Function`` without a vmap rule (checked in :class:`~harness.core.config.MetaConfig`);
* modules with buffers (BatchNorm running statistics): the sequential engine updates them task after
  task, in place, which a batched forward cannot reproduce exactly -- use ``norm=group``;
* dropout (any module of the ``nn.Dropout`` family in training mode): ``vmap(randomness='different')``
  draws another random stream than the sequential loop, so the meta-gradients would not be the
  sequential engine's; randomness stays ``'error'``, and any other random operator (attention dropout
  inside ``nn.MultiheadAttention``, a layer's own ``torch.Generator``) is refused when vmap meets it;
* ``F.batch_norm`` / ``F.instance_norm`` called in the forward with an affine weight or bias (not as
  modules): their batching rule gives meta-gradients wrong by about 1e-2 (measured on small float64
  models); refused by :class:`VmapRules` when called (without affine parameters they are exact);
* ``.data`` reads and old-style ``autograd.Function`` (no ``setup_context``): torch.func refuses them;
  the harness says so in one line (:func:`_unbatchable_is_refused`);
* tasks of unequal shapes (they are stacked).

A checkpoint inside the model's forward (``harness.checkpoint`` or torch's own) is a plain call here:
vectorized variants never checkpoint (:mod:`harness.core.recompute`).

Run it::

    python -m harness run --variant vmaml --preset sinusoid      # or any variant with --set vectorize=1
"""
from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from harness.core.config import ConfigError, MetaConfig, Task
from harness.core.update import sgd_update, step_lr

__all__ = ["VmapRules", "VectorizableLearner", "check_vectorizable", "stack_tasks", "vectorized_meta_gradients"]

# batching rules of these norms' backward are wrong for the input gradient (pytorch/functorch#534, open in
# torch 2.14.1; layer_norm's is shown by tests/test_vectorized.py and worked around by VmapRules)
WRONG_UNDER_VMAP = (nn.modules.batchnorm._NormBase,)  # BatchNorm*, InstanceNorm*, with or without buffers
# recurrent modules: aten::lstm_cell has no batching rule, and LSTMCell's default state is written in place
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class VectorizableLearner(Protocol):
    """What the vectorized path reads from :class:`~harness.core.engine.MetaLearner`."""

    model: nn.Module
    cfg: MetaConfig
    adapted: list[str]
    lrs: nn.Module | None

    def loss_with(self, weights: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor: ...


def check_vectorizable(model: nn.Module) -> None:
    """A one-line :class:`ConfigError` naming the first module the vectorized path cannot run exactly."""
    for name, module in model.named_modules():
        if isinstance(module, WRONG_UNDER_VMAP):
            raise ConfigError(f"vectorize: module {name!r} ({type(module).__name__}) cannot be vectorized exactly: "
                              "its backward batching rule is wrong for the input gradient (pytorch/functorch#534) "
                              "and running statistics are updated task after task (use norm=group, or vectorize=0)")
        if isinstance(module, RECURRENT):
            raise ConfigError(f"vectorize: module {name!r} ({type(module).__name__}) cannot be vmapped over tasks "
                              "(no batching rule for aten::lstm_cell; the default state is written in place); "
                              "valid: vectorize=0")
        buffers = [n for n, b in module.named_buffers(recurse=False) if b is not None]
        if buffers:
            raise ConfigError(f"vectorize: module {name or '<root>'!r} ({type(module).__name__}) has buffers "
                              f"({', '.join(buffers)}) that the sequential engine updates task after task; a "
                              "vmapped forward cannot reproduce that exactly (use GroupNorm/LayerNorm, e.g. "
                              "norm=group, or vectorize=0)")
        if isinstance(module, DROPOUT) and module.training and module.p > 0:
            raise ConfigError(f"vectorize: module {name!r} ({type(module).__name__}) draws random numbers; "
                              "vmap(randomness='different') is not the sequential engine's random stream "
                              "(remove dropout or vectorize=0)")


def _layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` from elementary operators, whose vmap rules are right at every order."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(x.var(dims, correction=0, keepdim=True) + eps)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


_AFFINE_NORMS = {F.batch_norm: "batch_norm", torch.batch_norm: "batch_norm", F.instance_norm: "instance_norm",
                 torch.instance_norm: "instance_norm"}


def _affine(func: Callable[..., Tensor], args: tuple, kwargs: dict) -> bool:
    """Whether a batch/instance norm call passes a weight or a bias (positional or keyword).  ``F.*`` take
    ``(input, running_mean, running_var, weight, bias, ...)``, ``torch.*`` ``(input, weight, bias, ...)``."""
    first = 3 if func in (F.batch_norm, F.instance_norm) else 1
    given = [kwargs.get("weight"), kwargs.get("bias"), *args[first:first + 2]]
    return any(isinstance(t, Tensor) for t in given)


class VmapRules(TorchFunctionMode):
    """Inside the vectorized meta-gradient: ``layer_norm`` runs as :func:`_layer_norm`, and a batch/instance norm
    with affine parameters is refused.

    The fused ``layer_norm`` kernel's backward batching rule gives a wrong input gradient in the second-order
    term (pytorch/functorch#534), a relative error of about 4e-3 in the meta-gradient of a small pre-norm
    residual MLP in float64 (``tests/test_vectorized.py::test_without_the_composed_layer_norm_vmap_gets_the_
    second_order_term_wrong``); ``F.batch_norm``/``F.instance_norm`` with a weight were wrong by 1e-2."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.layer_norm or func is torch.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func in _AFFINE_NORMS and _affine(func, args, kwargs):
            raise ConfigError(f"vectorize: the forward calls {_AFFINE_NORMS[func]} with an affine weight/bias, whose "
                              "vmap batching rule gives wrong meta-gradients (pytorch/functorch#534); use "
                              "GroupNorm/LayerNorm, or vectorize=0")
        return func(*args, **kwargs)


def stack_tasks(tasks: Sequence[Task]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Support and query sets stacked along a new leading task axis; unequal shapes are refused."""
    if not tasks:
        raise ConfigError("vectorize: the meta-batch is empty")
    fields = ("support_x", "support_y", "query_x", "query_y")
    out = []
    for f in fields:
        shapes = {tuple(getattr(t, f).shape) for t in tasks}
        if len(shapes) != 1:
            raise ConfigError(f"vectorize: tasks have unequal {f} shapes {sorted(shapes)}; vmap stacks the "
                              "tasks, so every task needs the same shapes (or vectorize=0)")
        out.append(torch.stack([getattr(t, f) for t in tasks]))
    return out[0], out[1], out[2], out[3]


def _task_loss_fn(learner: VectorizableLearner, loss_scale: float) -> Callable[..., Tensor]:
    """One task's query loss after K functional inner steps, as a pure function of
    ``(weights, raw LRs, support_x, support_y, query_x, query_y)`` -- what vmap maps over tasks."""
    cfg, adapted = learner.cfg, list(learner.adapted)

    def support_loss(fast: dict[str, Tensor], rest: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        loss = learner.loss_with({**rest, **fast}, x, y)
        return loss * loss_scale if loss_scale != 1.0 else loss

    inner_grad = grad(support_loss)  # nested under the outer grad: second order

    def task_loss(weights: dict[str, Tensor], raw: dict[str, Tensor], sx: Tensor, sy: Tensor,
                  qx: Tensor, qy: Tensor) -> Tensor:
        lrs = {k: F.softplus(v) for k, v in raw.items()}
        fast = {n: weights[n] for n in adapted}
        rest = {n: w for n, w in weights.items() if n not in fast}
        for k in range(cfg.inner_steps):
            grads = inner_grad(fast, rest, sx, sy)
            fast = sgd_update(fast, {n: _inner(grads[n], cfg, loss_scale) for n in adapted},
                              lambda n, k=k: step_lr(learner.lrs, lrs, n, k, cfg.inner_lr))
        loss = learner.loss_with({**rest, **fast}, qx, qy)
        return loss * loss_scale if loss_scale != 1.0 else loss

    return task_loss


def _inner(g: Tensor, cfg: MetaConfig, loss_scale: float) -> Tensor:
    """The inner gradient as the update uses it: unscaled (fp16), detached for first order."""
    g = g / loss_scale if loss_scale != 1.0 else g
    return g.detach() if cfg.first_order else g


def _chunk_gradients(learner: VectorizableLearner, weights: dict[str, Tensor], raw: dict[str, Tensor],
                     stacked: Sequence[Tensor], share: float, loss_scale: float
                     ) -> tuple[tuple[dict[str, Tensor], dict[str, Tensor]], Tensor]:
    """Outer gradient of ``share * mean(query losses of the chunk)`` and the per-task (scaled) losses."""
    per_task = vmap(_task_loss_fn(learner, loss_scale), in_dims=(None, None, 0, 0, 0, 0))

    def outer(w: dict[str, Tensor], r: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses = per_task(w, r, *stacked)
        return losses.mean() * share, losses.detach()

    with VmapRules():
        return grad(outer, argnums=(0, 1), has_aux=True)(weights, raw)


# what torch.func raises for what it cannot transform -> the harness's one-line reason
_REFUSED_BY_TORCH_FUNC = {
    "called random operation while in randomness error mode":
        "the model draws random numbers inside the forward (attention dropout, F.dropout, a layer's own "
        "torch.Generator, ...); vmap's random stream is not the sequential engine's (remove it, or vectorize=0)",
    "accessing `data` under vmap transform is not allowed":
        "the forward reads a tensor's .data, which torch.func cannot transform (use the tensor itself, or "
        "vectorize=0)",
    "it must override the setup_context staticmethod":
        "the forward calls an old-style torch.autograd.Function (forward with ctx, no setup_context), which "
        "torch.func cannot transform (give it a setup_context, or vectorize=0)",
    "don't yet support saved tensor hooks":
        "the forward uses saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks), which torch.func "
        "cannot transform (vectorize=0)",
}


def _unbatchable_is_refused(fn: Callable[..., object], *args: object):  # noqa: ANN202
    """``fn(*args)``; what torch.func cannot transform exactly (an operator without a vmap batching rule such as
    ``aten::lstm_cell``, random numbers, ``.data``, old-style autograd Functions) is a one-line ConfigError."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        text = str(exc)
        if "Batching rule not implemented for" in text:
            op = text.split("Batching rule not implemented for", 1)[1].split(".")[0].strip()
            raise ConfigError(f"vectorize: torch.func.vmap has no batching rule for {op}, which this model uses; "
                              "valid: vectorize=0") from None
        for needle, reason in _REFUSED_BY_TORCH_FUNC.items():
            if needle in text:
                raise ConfigError(f"vectorize: {reason}") from None
        raise


def vectorized_meta_gradients(learner: VectorizableLearner, tasks: Sequence[Task], loss_scale: float = 1.0
                              ) -> tuple[dict[str, Tensor], float]:
    """Mean-over-tasks meta-gradients (keys ``w.<name>``, ``lr.<key>``) and the mean query loss, all tasks
    in one vmapped inner loop (in chunks of ``cfg.vmap_chunk`` tasks when set).  Same contract as
    :meth:`~harness.core.engine.OuterLoop.meta_gradients`, fp16 loss scale included."""
    check_vectorizable(learner.model)
    tasks = list(tasks)
    params = dict(learner.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    # detached: torch.func.grad differentiates on its own levels; the parameters themselves (requires_grad)
    # would also have autograd record every operator of every chunk on the caller's tape, and the returned
    # gradients (and their sum) would carry that graph -- every chunk's, until the step ends
    weights = {n: p.detach() for n, p in params.items()}
    raw = ({k: v.detach() for k, v in learner.lrs.raw.items()}  # type: ignore[attr-defined]
           if learner.lrs is not None else {})
    chunk = learner.cfg.vmap_chunk or len(tasks)
    total = {**{f"w.{n}": torch.zeros_like(weights[n]) for n in trainable},
             **{f"lr.{k}": torch.zeros_like(v) for k, v in raw.items()}}
    losses: list[Tensor] = []
    for start in range(0, len(tasks), chunk):
        part = tasks[start:start + chunk]
        (gw, gr), chunk_losses = _unbatchable_is_refused(_chunk_gradients, learner, weights, raw,
                                                         stack_tasks(part), len(part) / len(tasks), loss_scale)
        for n in trainable:
            total[f"w.{n}"] += gw[n]
        for k in raw:
            total[f"lr.{k}"] += gr[k]
        losses.append(chunk_losses / loss_scale if loss_scale != 1.0 else chunk_losses)
    return total, torch.cat(losses).mean().item()
