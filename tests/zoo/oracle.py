"""The yardsticks for the zoo: an independent MAML and central finite differences.

``oracle`` is MAML written from the paper, sharing no code with ``harness.core``: ``functional_call`` with
the fast weights, ``torch.autograd.grad`` for the inner gradient (``create_graph`` unless first order), the
SGD update with a softplus LR per group (layer = owning module, tensor, element; optionally one per step),
the query loss, and the outer ``autograd.grad``.  Every checkpoint runs as a plain call: ``harness.checkpoint``
through its switch (``layer_checkpointing(False)``), torch's own by the oracle's own means (torch's
``_checkpoint_impl`` patched to call the function for the oracle's duration), so the models run exactly as
written, without any recomputation.

RNG alignment (dropout): both the engine and the oracle draw random numbers only in forwards, in the same
order (task by task: K support forwards, then the query forward).  ``run_engine`` and ``run_oracle`` seed the
global generator with the same seed before they start, so they draw the same masks -- provided the engine's
recomputations restore the RNG state and leave the stream as they found it, which is the claim under test.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Mapping, NamedTuple
from unittest import mock

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.func import functional_call

from harness.core.ckpt import layer_checkpointing
from harness.core.config import ConfigError, Task
from harness.core.engine import MetaLearner
from harness.variants import Variant

__all__ = ["EngineRun", "OracleRun", "finite_difference_error", "oracle_adapted", "rel_err", "run_engine",
           "run_oracle", "SEED"]

SEED = 1234
INNER_LR = 0.1


class OracleRun(NamedTuple):
    loss: float
    w: dict[str, Tensor]  # parameter name -> meta-gradient
    lr: dict[str, Tensor]  # LR group -> meta-gradient of its raw (pre-softplus) value
    buffers: dict[str, Tensor]


class EngineRun(NamedTuple):
    loss: float
    w: dict[str, Tensor]
    lr: dict[str, Tensor]  # engine LR key -> meta-gradient
    buffers: dict[str, Tensor]
    learner: nn.Module


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def oracle_adapted(model: nn.Module, adapt_last: int | None) -> list[str]:
    """Trainable parameters, or those of the last ``adapt_last`` parameter-owning modules."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if adapt_last is None:
        return names
    owners = list(dict.fromkeys(_owner(n) for n in names))
    return [n for n in names if _owner(n) in set(owners[-adapt_last:])]


def _plain(function, args, kwargs, **_options):  # noqa: ANN001, ANN202 - torch's _checkpoint_impl signature
    return function(*args, **kwargs)


def _plain_generator(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - torch < 2.14's non-reentrant generator
    yield  # torch's checkpoint body calls fn itself, between the generator's two steps


class _PlainReentrant:  # torch < 2.14's CheckpointFunction, as checkpoint(use_reentrant=True) calls it
    @staticmethod
    def apply(function, _preserve_rng_state, *args):  # noqa: ANN001, ANN205
        return function(*args)


@contextlib.contextmanager
def no_checkpoints() -> Iterator[None]:
    """Every checkpoint a plain call: harness's by its switch, torch's (every form) by patching torch where its
    checkpoint calls in (``_checkpoint_impl`` from torch 2.14, the reentrant and non-reentrant parts before)."""
    tuc = torch.utils.checkpoint
    with contextlib.ExitStack() as stack:
        stack.enter_context(layer_checkpointing(False))
        if hasattr(tuc, "_checkpoint_impl"):
            stack.enter_context(mock.patch.object(tuc, "_checkpoint_impl", _plain))
        else:
            stack.enter_context(mock.patch.object(tuc, "_checkpoint_without_reentrant_generator", _plain_generator))
            stack.enter_context(mock.patch.object(tuc, "CheckpointFunction", _PlainReentrant))
        yield


def oracle_group(name: str, granularity: str) -> str:
    return _owner(name) if granularity == "layer" else name


def run_oracle(model: nn.Module, tasks: list[Task], loss_fn, *, inner_steps: int, first_order: bool,
               lr_raw: Mapping[str, Tensor] | None, granularity: str, per_step: bool,
               adapt_last: int | None = None, seed: int = SEED) -> OracleRun:
    """Meta-gradients (mean over tasks) of MAML on a deep copy of ``model``; ``lr_raw``: group -> raw LR."""
    model = copy.deepcopy(model)
    init = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    raws = {g: r.detach().clone().requires_grad_() for g, r in (lr_raw or {}).items()}
    names = oracle_adapted(model, adapt_last)
    leaves = {n: t for n, t in init.items() if t.requires_grad}
    w_grads = {n: torch.zeros_like(t) for n, t in leaves.items()}
    lr_grads = {g: torch.zeros_like(r) for g, r in raws.items()}
    losses = []
    torch.manual_seed(seed)
    with no_checkpoints():
        for task in tasks:
            lrs = {g: F.softplus(r) for g, r in raws.items()}
            w = dict(init)
            for k in range(inner_steps):
                loss = loss_fn(functional_call(model, w, (task.support_x,)), task.support_y)
                grads = torch.autograd.grad(loss, [w[n] for n in names], create_graph=not first_order,
                                            allow_unused=True)
                for n, g in zip(names, grads):
                    g = torch.zeros_like(w[n]) if g is None else g
                    lr = INNER_LR if not raws else lrs[oracle_group(n, granularity)]
                    lr = lr[k] if (raws and per_step) else lr
                    w[n] = w[n] - lr * g
            query = loss_fn(functional_call(model, w, (task.query_x,)), task.query_y) / len(tasks)
            wanted = list(leaves.values()) + list(raws.values())
            grads = torch.autograd.grad(query, wanted, allow_unused=True)
            targets = [(w_grads, n) for n in leaves] + [(lr_grads, g) for g in raws]
            for (into, key), g in zip(targets, grads):
                if g is not None:
                    into[key] += g
            losses.append(query.item() * len(tasks))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return OracleRun(sum(losses) / len(losses), w_grads, lr_grads, buffers)


def _inv_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


def randomise_lrs(learner: MetaLearner, seed: int = 7) -> None:
    """Non-uniform LRs in [0.02, 0.3): a different value per group, per element, per step."""
    if learner.lrs is None:
        return
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for raw in learner.lrs.raw.values():
            lr = 0.02 + 0.28 * torch.rand(raw.shape, generator=gen, dtype=torch.float64)
            raw.copy_(_inv_softplus(lr).to(raw.dtype))


def build_learner(variant: Variant, model: nn.Module, loss_fn, *, inner_steps: int, granularity: str = "layer",
                  adapt_last: int | None = None) -> MetaLearner:
    """The variant's learner on ``model`` (ConfigError if the variant refuses the model)."""
    cfg = variant.config(inner_steps=inner_steps, inner_lr=INNER_LR, lr_granularity=granularity,
                         adapt_last=adapt_last)
    factory = getattr(variant, "learner", None)
    learner = factory(model, cfg, loss_fn) if callable(factory) else MetaLearner(model, cfg, loss_fn)
    randomise_lrs(learner)
    return learner


def run_engine(learner: MetaLearner, tasks: list[Task], seed: int = SEED) -> EngineRun:
    torch.manual_seed(seed)
    grads, loss = learner.meta_gradients(tasks)
    w = {k[2:]: g for k, g in grads.items() if k.startswith("w.")}
    lr = {k[3:]: g for k, g in grads.items() if k.startswith("lr.")}
    buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
    return EngineRun(loss, w, lr, buffers, learner)


def oracle_lr_raw(learner: MetaLearner, granularity: str) -> dict[str, Tensor] | None:
    """The engine's raw LRs regrouped by the oracle's own grouping, through the public mapping.

    Checks the mapping on the way: every parameter of one oracle group has one key, distinct groups distinct keys.
    """
    if learner.lrs is None:
        return None
    out: dict[str, Tensor] = {}
    key_of_group: dict[str, str] = {}
    for n in learner.adapted:
        group, key = oracle_group(n, granularity), learner.lrs.key_for(n)
        assert key_of_group.setdefault(group, key) == key, f"{n}: group {group!r} split over two LR keys"
        assert n in learner.lrs.names_of(key)
        out[group] = learner.lrs.raw[key]
    assert len(set(key_of_group.values())) == len(key_of_group), f"two groups share an LR key: {key_of_group}"
    return out


def _real_view(t: Tensor) -> Tensor:
    """Flat float64 values; a complex tensor as its real and imaginary parts."""
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).reshape(-1).double()


def _owned_generators(model: nn.Module) -> list[torch.Generator]:
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Generator)]


def rel_err(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``|a - b| / |b|`` over all tensors paired by name (``|a - b|`` when ``b`` is zero)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    if not b:
        return 0.0
    fa = torch.cat([_real_view(a[k]) for k in b])
    fb = torch.cat([_real_view(b[k]) for k in b])
    ref = fb.norm().item()
    return (fa - fb).norm().item() / (ref if ref > 0 else 1.0)


def compare(engine: EngineRun, oracle: OracleRun, granularity: str) -> dict[str, float]:
    """Relative errors of the engine against the oracle: weights, LRs (paired by the public mapping), loss, buffers."""
    learner = engine.learner
    lr_oracle = {}
    if learner.lrs is not None:
        lr_oracle = {k: oracle.lr[oracle_group(learner.lrs.names_of(k)[0], granularity)] for k in engine.lr}
    buffers_e = {n: b.double() for n, b in engine.buffers.items()}
    buffers_o = {n: b.double() for n, b in oracle.buffers.items()}
    return {"w": rel_err(engine.w, oracle.w), "lr": rel_err(engine.lr, lr_oracle),
            "loss": abs(engine.loss - oracle.loss) / max(abs(oracle.loss), 1e-300),
            "buffers": rel_err(buffers_e, buffers_o)}


def finite_difference_error(learner: MetaLearner, tasks: list[Task], *, directions: int = 2, h: float = 1e-5,
                            seed: int = SEED) -> float:
    """Central differences of the mean query loss along random directions vs the engine's meta-gradient.

    Returns ``|fd - g.v| / |g.v|`` over the directions.  Step ``h = 1e-5`` in float64: the truncation error is
    ``h^2 |L'''| / 6 ~ 1e-11`` and the rounding error ``eps |L| / h ~ 1e-11`` for these O(1) losses, both far
    below the 1e-7 bound.  Buffers are restored and the generator reseeded before every evaluation, so each
    one sees the same running statistics and dropout masks as the gradient.
    """
    params = learner.meta_parameters()
    buffers = {n: b.clone() for n, b in learner.model.named_buffers()}
    origin = {k: p.detach().clone() for k, p in params.items()}
    generators = [(g, g.get_state()) for g in _owned_generators(learner.model)]

    def reset(offset: Mapping[str, Tensor] | None = None, scale: float = 0.0) -> None:
        with torch.no_grad():
            for n, b in learner.model.named_buffers():
                b.copy_(buffers[n])
            for k, p in params.items():
                p.copy_(origin[k] if offset is None else origin[k] + scale * offset[k])
        torch.manual_seed(seed)
        for g, state in generators:
            g.set_state(state)

    def meta_loss() -> float:
        return sum(learner.task_loss(t).item() for t in tasks) / len(tasks)

    reset()
    grads, _ = learner.meta_gradients(tasks)
    gen = torch.Generator().manual_seed(seed + 1)
    fd, gv = [], []
    for _ in range(directions):
        v = {k: torch.randn(p.shape, generator=gen, dtype=torch.complex128 if p.is_complex() else torch.float64)
             .to(p.dtype) for k, p in params.items()}
        reset(v, h)
        plus = meta_loss()
        reset(v, -h)
        minus = meta_loss()
        fd.append((plus - minus) / (2 * h))
        gv.append(sum((_real_view(grads[k]) @ _real_view(v[k])).item() for k in params))  # Re <g, v>
    reset()
    diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(fd, gv)))
    return diff / math.sqrt(sum(b * b for b in gv))


def refusal(exc: Exception) -> str | None:
    """The reason a variant refuses a model (a ConfigError), else None."""
    return str(exc) if isinstance(exc, ConfigError) else None
