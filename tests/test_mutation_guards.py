"""One-line bugs that once survived the suite (issue 26's mutation run), each pinned by a test here:

* the meta-gradient sum taking one task's gradient tensor for two keys (``_accumulate``'s ``owned`` check);
* ``agreement`` pairing two gradient dicts by their order instead of by name;
* a step checkpoint's forward (a segment's, a binomial schedule's) building the double-backward graph it never
  uses.

(``check_agreement``'s buffer restore: ``tests/test_engine_properties.py``; the sum's storage for a gradient
shared between keys: ``tests/test_meta_gradient_memory.py``.)
"""
from __future__ import annotations

import gc
import math
import weakref
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from harness.core.engine import MetaLearner
from harness.core.grads import agreement
from harness.variants import registry
from tests.zoo.models import LayerNormMLP, mse, regression_tasks
from tests.zoo.oracle import build_learner, compare, oracle_lr_raw, run_engine, run_oracle

TOL = 1e-12


class SummedWeights(nn.Module):
    """The layer's weight is ``u + v``: autograd hands ``u`` and ``v`` one dense gradient tensor (first order)."""

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(3, 5))
        self.v = nn.Parameter(torch.randn(3, 5))
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ (self.u + self.v)))


@pytest.mark.parametrize("variant", ["fo", "lr_fo", "sckpt_lr_fo"])
def test_two_keys_sharing_one_dense_gradient_get_the_unrolled_maml_meta_gradient(variant: str) -> None:
    """Two tasks, two inner steps: the engine's meta-gradients equal plain unrolled MAML by torch.autograd
    (tests/zoo/oracle.py) in float64, although each task's gradients for ``u`` and ``v`` are one tensor."""
    torch.manual_seed(0)
    model = SummedWeights().double()
    tasks = regression_tasks(torch.Generator().manual_seed(0), n=2)
    learner = build_learner(registry()[variant], model, mse, inner_steps=2)
    params = learner.meta_parameters()
    first = dict(zip(params, torch.autograd.grad(learner.task_loss(tasks[0]), list(params.values()))))
    assert first["w.u"] is first["w.v"] and first["w.u"]._base is None  # the case under test
    oracle = run_oracle(model, tasks, mse, inner_steps=2, first_order=True, lr_raw=oracle_lr_raw(learner, "layer"),
                        granularity="layer", per_step=False)
    err = compare(run_engine(learner, tasks), oracle, "layer")
    assert err["w"] <= TOL and err["lr"] <= TOL and err["loss"] <= TOL, err


def test_agreement_pairs_gradients_by_name_not_by_dict_order() -> None:
    """The same keys in another order: equal values give no error; one key's value changed gives its error."""
    g = {"w.a": torch.tensor([1.0, 2.0]), "w.b": torch.tensor([10.0, -4.0, 3.0]), "lr.x": torch.tensor(0.5),
         "lr.y": torch.tensor([2.0, 7.0])}
    reordered = dict(reversed(list(g.items())))
    assert list(reordered) != list(g)
    same = agreement(reordered, g)
    assert same == {"w_rel_err": 0.0, "w_cosine": pytest.approx(1.0), "lr_rel_err": 0.0,
                    "lr_cosine": pytest.approx(1.0)}, same
    wrong = {**reordered, "w.a": torch.tensor([1.0, 5.0]), "lr.y": torch.tensor([2.0, 9.0])}
    err = agreement(wrong, g)
    ref_w, ref_lr = math.sqrt(1 + 4 + 100 + 16 + 9), math.sqrt(0.25 + 4 + 49)
    assert err["w_rel_err"] == pytest.approx(3.0 / ref_w) and err["lr_rel_err"] == pytest.approx(2.0 / ref_lr), err


class _SavedTensors:
    """The tensors autograd saves for a backward under ``saved_tensors_hooks``: how many were saved, how many
    are still held (by a graph node that is alive)."""

    class _Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def __init__(self) -> None:
        self.held: list[weakref.ref] = []

    def pack(self, t: torch.Tensor) -> _Held:
        held = self._Held(t)
        self.held.append(weakref.ref(held))
        return held

    def __call__(self):  # noqa: ANN204
        return saved_tensors_hooks(self.pack, lambda held: held.t)

    @property
    def saved(self) -> int:
        return len(self.held)

    @property
    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.held)


@pytest.mark.parametrize("variant", ["sckpt", "sckpt_lr", "ckpt_sckpt_lr", "bckpt_lr", "ckpt_bckpt_lr"])
def test_a_step_checkpoints_forward_saves_only_what_a_values_only_inner_loop_saves(variant: str) -> None:
    """Second order, K = 4 steps, in segments of one or on a binomial schedule: the forward of the
    step-checkpointed inner loop saves for a backward only what the same steps save without create_graph (the
    first-order inner loop), and keeps only the checkpoint's own inputs (a segment's, by ``save_for_backward``;
    the schedule holds its snapshots itself).  A double-backward graph built there is never used: the backward
    rebuilds it."""
    steps = 4
    torch.manual_seed(0)
    cfg = registry()[variant].config(inner_steps=steps, inner_lr=0.1)
    learner = MetaLearner(LayerNormMLP().double(), cfg, mse)
    values_only_learner = MetaLearner(learner.model, replace(cfg, step_ckpt=0, snapshots=0, first_order=True), mse)
    task = regression_tasks(torch.Generator().manual_seed(0), n=1)[0]
    lrs = learner.lr_values()
    lrs = None if lrs is None else {k: v.detach().requires_grad_() for k, v in lrs.items()}
    leaves = {n: p.detach().requires_grad_() for n, p in learner.initial_weights().items()}
    kept = steps * (len(leaves) + len(lrs or {})) if cfg.snapshots == 0 else 0
    values_only, checkpointed = _SavedTensors(), _SavedTensors()
    with values_only():
        values_only_learner.inner_loop(leaves, lrs, task.support_x, task.support_y, range(steps))
    with checkpointed():
        fast = learner.adapt(task.support_x, task.support_y, lrs=lrs)
    assert all(t.grad_fn is not None for t in fast.values())  # the outer backward can still reach the inputs
    assert values_only.saved > 0
    assert checkpointed.alive == kept, (checkpointed.alive, kept)
    assert checkpointed.saved - kept == values_only.saved, (checkpointed.saved, kept, values_only.saved)


def test_agreement_cosine_is_the_cosine_of_the_two_vectors() -> None:
    """Exact small values: the cosine of (1, 5, 10, -4, 3) and (1, 2, 10, -4, 3), and of two parallel LR
    vectors of unequal norm (a cosine over equal vectors is 1 whatever the denominator)."""
    ref = {"w.a": torch.tensor([1.0, 2.0]), "w.b": torch.tensor([10.0, -4.0, 3.0]), "lr.x": torch.tensor(0.5)}
    got = {"w.a": torch.tensor([1.0, 5.0]), "w.b": torch.tensor([10.0, -4.0, 3.0]), "lr.x": torch.tensor(2.0)}
    a, b = [1.0, 5.0, 10.0, -4.0, 3.0], [1.0, 2.0, 10.0, -4.0, 3.0]
    cosine = sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))
    out = agreement(got, ref)
    assert out["w_cosine"] == pytest.approx(cosine, rel=1e-6) and out["w_cosine"] < 0.99, out
    assert out["lr_cosine"] == pytest.approx(1.0), out


def test_step_adds_to_a_grad_already_there_as_backward_does() -> None:
    """Two ``step`` calls before the optimizer's step accumulate, as two ``backward`` calls would."""
    torch.manual_seed(0)
    learner = MetaLearner(LayerNormMLP().double(), registry()["lr"].config(inner_steps=1, inner_lr=0.1), mse)
    first, second = (regression_tasks(torch.Generator().manual_seed(s), n=2) for s in (0, 1))
    g1, _ = learner.meta_gradients(first)
    g2, _ = learner.meta_gradients(second)
    learner.step(first)
    learner.step(second)
    for k, p in learner.meta_parameters().items():
        torch.testing.assert_close(p.grad, g1[k] + g2[k], rtol=1e-12, atol=1e-12, msg=k)
