"""Claims about what the engine computes, beyond agreement with its own reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from harness.core.ckpt import checkpoint
from harness.core.config import MetaConfig, Task
from harness.core.engine import MetaLearner, adapted_names
from harness.core.grads import agreement, split_grads
from harness.loop.agreement import check_agreement
from tests.conftest import small_experiment
from tests.zoo.models import UserBufferLayer, mse, regression_tasks

SECOND_ORDER = ["maml", "lr", "ckpt", "ckpt_lr", "sckpt_lr", "ckpt_sckpt_lr"]


@pytest.mark.parametrize("variant", SECOND_ORDER)
def test_second_order_meta_loss_passes_gradcheck(variant: str) -> None:
    """d(meta-loss)/d(a subset of initial weights, the LRs) matches finite differences in float64."""
    exp = small_experiment(variant, "quick", inner_steps=2, hidden=(6, 6))
    task = exp.sample()[0]
    learner = exp.learner
    head_w = learner.model.head.weight  # the subset of initial weights under test
    lr_raw = list(learner.lrs.raw.values()) if learner.lrs is not None else []

    def meta_loss(w: torch.Tensor, *raws: torch.Tensor) -> torch.Tensor:
        weights = learner.initial_weights()
        weights["head.weight"] = w
        lrs = None
        if learner.lrs is not None:
            lrs = {k: torch.nn.functional.softplus(r) for k, r in zip(learner.lrs.raw, raws)}
        fast = learner.adapt(task.support_x, task.support_y, weights=weights, lrs=lrs)
        return learner.loss_fn(learner.forward_with(fast, task.query_x), task.query_y)

    inputs = (head_w.detach().clone().requires_grad_(), *[r.detach().clone().requires_grad_() for r in lr_raw])
    assert torch.autograd.gradcheck(meta_loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def _grads(variant: str, preset: str = "cpu-bench"):
    exp = small_experiment(variant, preset, inner_steps=2)
    grads, _ = exp.learner.meta_gradients(exp.sample())
    return split_grads(grads)


def test_first_order_differs_from_second_order() -> None:
    w_so, _ = _grads("maml")
    w_fo, _ = _grads("fo")
    err = agreement({f"w.{k}": v for k, v in w_fo.items()}, {f"w.{k}": v for k, v in w_so.items()})
    assert err["w_rel_err"] > 1e-3


def test_first_order_still_reaches_initial_weights_through_the_update() -> None:
    """FOMAML: the outer gradient flows to every initial weight (unlike a no-tracking mode)."""
    w_fo, lr_fo = _grads("lr_fo")
    assert all(g.abs().sum() > 0 for g in w_fo.values())
    assert all(g.abs().sum() > 0 for g in lr_fo.values())


@pytest.mark.parametrize("variant", ["lr", "lr_fo", "ckpt_lr", "ckpt_lr_fo", "sckpt_lr", "ckpt_sckpt_lr"])
def test_learnable_lrs_receive_non_zero_meta_gradients(variant: str) -> None:
    _, lr = _grads(variant)
    assert lr and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in lr.values())


def test_inner_loop_never_touches_dot_grad() -> None:
    exp = small_experiment("ckpt_lr", "cpu-bench", inner_steps=2)
    exp.learner.meta_gradients(exp.sample())
    assert all(p.grad is None for p in exp.learner.parameters())


def test_adapt_last_limits_the_inner_loop_but_all_weights_are_meta_learned() -> None:
    exp = small_experiment("ckpt_lr", "cpu-bench", inner_steps=2)
    cfg = MetaConfig(inner_steps=2, learn_lr=True, layer_ckpt=True, adapt_last=2)
    learner = MetaLearner(exp.learner.model, cfg, exp.learner.loss_fn)
    assert learner.adapted == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert set(learner.lrs.raw) == {"norm", "head"}
    tasks = exp.sample()
    fast = learner.adapt(tasks[0].support_x, tasks[0].support_y)
    assert fast["embed.weight"] is learner.model.embed.weight  # not adapted
    grads, _ = learner.meta_gradients(tasks)
    assert grads["w.embed.weight"].abs().sum() > 0  # but meta-learned
    ref = MetaLearner(copy.deepcopy(learner.model), cfg.reference(), learner.loss_fn)
    ref.lrs.load_state_dict(learner.lrs.state_dict())
    assert agreement(grads, ref.meta_gradients(tasks)[0])["w_rel_err"] <= 1e-12


def test_lr_granularities_have_the_documented_shapes() -> None:
    model = small_experiment("maml", "cpu-bench").learner.model
    names = adapted_names(model, None)
    for gran, per_step, expect in [("layer", False, ()), ("tensor", True, (3,)), ("element", False, None)]:
        learner = MetaLearner(model, MetaConfig(inner_steps=3, learn_lr=True, lr_granularity=gran,
                                                lr_per_step=per_step), lambda a, b: (a - b).pow(2).mean())
        if gran == "layer":
            assert len(learner.lrs.raw) == len({n.rpartition(".")[0] for n in names})
        if expect is not None:
            assert all(tuple(r.shape) == expect for r in learner.lrs.raw.values())
        else:
            assert learner.lrs.raw[learner.lrs.key_for("head.weight")].shape == model.head.weight.shape
        lr0 = torch.nn.functional.softplus(next(iter(learner.lrs.raw.values()))).flatten()[0].item()
        assert lr0 == pytest.approx(0.01)


class _ReadsModuleParams(nn.Module):
    """The seed's trap: a checkpointed function that reads the module's parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(4, 1)
        self.naive = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.naive:
                x = torch.utils.checkpoint.checkpoint(lambda h, m=layer: m(h), x, use_reentrant=False)
            else:
                x = checkpoint(layer, x)
        return self.head(x)


class _RebindsParameters(MetaLearner):
    """A stateful binding, as in the seed: fast weights written into the modules; forward reads them."""

    def forward_with(self, weights, x, *, buffers=None):  # type: ignore[override]
        for name, t in weights.items():
            mod = self.model.get_submodule(name.rpartition(".")[0])
            mod._parameters[name.rpartition(".")[2]] = t
        return self.model(x)


def test_checkpointing_a_function_that_reads_module_parameters_is_caught_as_a_large_error() -> None:
    torch.manual_seed(0)
    model = _ReadsModuleParams().double()
    model.naive = True
    x = torch.randn(8, 4, dtype=torch.float64)
    tasks = [Task(x, x.sum(1, keepdim=True), x.flip(0), x.sum(1, keepdim=True).flip(0))]
    loss = lambda a, b: (a - b).pow(2).mean()  # noqa: E731
    cfg = MetaConfig(inner_steps=2, inner_lr=0.3)
    originals = dict(model.named_parameters())
    wrong = _RebindsParameters(model, cfg, loss)
    wrong_grads = {k: g.clone() for k, g in wrong.meta_gradients(tasks)[0].items()}
    for name, p in originals.items():  # rebind the real parameters
        model.get_submodule(name.rpartition(".")[0])._parameters[name.rpartition(".")[2]] = p
    model.naive = False
    right = MetaLearner(model, cfg.reference(), loss)
    err = agreement(wrong_grads, right.meta_gradients(tasks)[0])["w_rel_err"]
    assert err > 0.05, err


def test_batchnorm_running_statistics_are_updated_once_per_forward_under_recomputation() -> None:
    """Buffers rule: the first call updates, recomputations run on clones."""
    stats = {}
    for variant in ("maml", "ckpt", "lr", "ckpt_sckpt_lr"):
        exp = small_experiment(variant, "conv4", inner_steps=2)
        tasks = exp.sample()
        exp.learner.meta_gradients(tasks)
        bn = exp.learner.model.blocks[0][1]
        stats[variant] = (bn.running_mean.clone(), bn.num_batches_tracked.item())
    assert stats["maml"][1] == 2 * 3  # 2 tasks x (2 support forwards + 1 query forward)
    for variant, reference in (("ckpt", "maml"), ("ckpt_sckpt_lr", "lr")):
        assert stats[variant][1] == stats[reference][1]
        assert torch.equal(stats[variant][0], stats[reference][0])


def test_drop_in_checkpoint_binds_fast_weights_in_a_users_own_model() -> None:
    """A user's model calling harness.checkpoint works under functional_call with fast weights."""
    torch.manual_seed(0)
    model = _ReadsModuleParams().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    w = {n: (p * 1.5).detach().requires_grad_() for n, p in model.named_parameters()}
    out = functional_call(model, w, (x,)).sum()
    g = torch.autograd.grad(out, list(w.values()))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(w[n])
    model.zero_grad()
    model.naive = True
    model(x).sum().backward()
    for gi, p in zip(g, model.parameters()):
        assert torch.equal(gi, p.grad)


def _buffer_reading_cell():
    """A ``ckpt`` cell on the zoo's UserBufferLayer: every forward updates a running centre and a call counter,
    and the output reads them, so a computation that starts from other buffers gets another gradient."""
    exp = small_experiment("ckpt", "quick", inner_steps=2)
    torch.manual_seed(0)
    exp.learner = MetaLearner(UserBufferLayer().double(), exp.learner.cfg, mse)
    return exp, regression_tasks(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cell", ["conv4 batchnorm", "user buffer layer"])
def test_check_agreement_restores_buffers_for_the_reference(cell: str) -> None:
    """The buffers after ``check_agreement`` are the ones it found (tensor for tensor: BatchNorm's running
    statistics and batch counter, a user's centre and call counter), though each of its computations updates
    them; and the reference started from them too (its gradient is the learner's, on a model whose output
    reads its buffers)."""
    if cell == "conv4 batchnorm":
        exp = small_experiment("ckpt", "conv4", inner_steps=1)
        tasks = exp.sample()
    else:
        exp, tasks = _buffer_reading_cell()
    before = {n: b.clone() for n, b in exp.learner.named_buffers()}
    assert before
    agree = check_agreement(exp, tasks)
    after = dict(exp.learner.named_buffers())
    assert set(after) == set(before)
    changed = [n for n in before if not torch.equal(after[n], before[n])]
    assert not changed, f"buffers not restored: {changed}"
    assert agree["w_rel_err"] <= 1e-12 and agree["w_cosine"] == pytest.approx(1.0)
    exp.learner.meta_gradients(tasks)  # one computation does update them: the equality above is not vacuous
    assert any(not torch.equal(b, before[n]) for n, b in exp.learner.named_buffers())
