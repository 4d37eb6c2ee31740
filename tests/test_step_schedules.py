"""Claims about the step schedules (harness.core.schedules) and their executor (harness.core.scheduled):

* exactness: binomial checkpointing with every number of stored states s = 1..K (K = 1, 2, 7, 64) and
  segments rebuilt one step at a time (lengths that do and do not divide K) give the plain reference's
  meta-gradients, query loss, final buffers and RNG streams in float64 to 1e-12 -- with learnable LRs at every
  granularity and per step, dropout, a layer's own generator, BatchNorm, per-layer checkpointing, frozen and
  non-adapted parameters and a loss scale, first and second order;
* optimality: the values-only step evaluations the executor performs are Griewank's minimum (closed form,
  checked against a brute-force DP of the recurrence) plus the output step, each step is rebuilt once, and at
  most s snapshots are held at once;
* memory: the binomial peak grows far slower with K than one-weight-copy-per-step checkpointing (sckpt).
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from harness import checkpoint
from harness.bench.cells import Cell, variant_for
from harness.bench.measure import measure_cpu_memory
from harness.loop.train import StepRunner
from harness.core import ConfigError, MetaConfig, MetaLearner, Task
from harness.core.schedules import Advance, Load, Rebuild, Schedule, Store, binomial, one_step_segments
from harness.core.scheduled import traced
from harness.variants import registry
from tests.conftest import small_experiment
from tests.zoo.models import RunningCentre
from tests.zoo.user_written import NoisyLayer

TOL = 1e-12


class Tiny(nn.Module):
    """The cheap model: 2 -> 4 -> 1."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(2, 4), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(x)))


class Stateful(nn.Module):
    """BatchNorm buffers, a buffer the output reads (RunningCentre: BatchNorm's are not read in training), dropout
    (global stream) and a layer's own generator, inside harness.checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4), RunningCentre(4))
        self.drop = nn.Dropout(0.3)
        self.noisy, self.head = NoisyLayer(4), nn.Linear(4, 2)

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return self.noisy(self.drop(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, torch.tanh(self.norm(self.inp(x)))))


def tasks_for(model: type[nn.Module], n: int) -> list[Task]:
    width, out = (2, 1) if model is Tiny else (3, 2)
    g = torch.Generator().manual_seed(3)
    r = functools.partial(torch.randn, generator=g, dtype=torch.float64)
    return [Task(r(6, width), r(6, out), r(6, width), r(6, out)) for _ in range(n)]


def run(cfg: MetaConfig, model: type[nn.Module] = Stateful, n_tasks: int = 2, loss_scale: float = 1.0,
        frozen: bool = False):
    """Meta-gradients, loss, final buffers, RNG states after, and the executor's trace."""
    torch.manual_seed(0)
    net = model().double()
    if frozen:
        net.head.bias.requires_grad_(False)
    learner = MetaLearner(net, cfg, nn.functional.mse_loss)
    if learner.lrs is not None:  # non-uniform LRs: a step or group mixed up changes the result
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in learner.lrs.raw.values():
                p.add_(0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    torch.manual_seed(7)
    with traced() as trace:
        grads, loss = learner.meta_gradients(tasks_for(model, n_tasks), loss_scale)
    after = [torch.get_rng_state()] + [m.gen.get_state() for m in net.modules() if isinstance(m, NoisyLayer)]
    return grads, loss, dict(net.named_buffers()), after, trace


def assert_same(ref, got) -> None:
    (g0, l0, b0, r0, _), (g1, l1, b1, r1, _) = ref, got
    assert abs(l0 - l1) <= TOL * abs(l0)
    for k in g0:
        assert ((g0[k] - g1[k]).abs().max() <= TOL * g0[k].abs().max().clamp_min(1e-300)), k
    for k in b0:
        assert (b0[k].double() - b1[k].double()).abs().max() <= TOL * b0[k].double().abs().max().clamp_min(1), k
    assert all(torch.equal(a, b) for a, b in zip(r0, r1)), "the RNG streams differ after the meta-step"


def config(K: int, first_order: bool, **kw) -> MetaConfig:
    base = dict(inner_steps=K, inner_lr=0.1, first_order=first_order, learn_lr=True, lr_granularity="element",
                lr_per_step=True)
    return MetaConfig(**{**base, **kw})


# -- closed form and brute force ------------------------------------------------------------------
def griewank(K: int, s: int) -> int:
    """Fewest values-only forward steps to reverse K steps with s stored states (the initial one included):
    the smallest r with K <= C(s + r, s), then r*K - C(s + r, r - 1) (the rebuilt steps not counted)."""
    r = next(r for r in range(K + 1) if K <= math.comb(s + r, s))
    return r * K - (math.comb(s + r, r - 1) if r >= 1 else 0)


@functools.lru_cache(maxsize=None)
def brute(length: int, s: int) -> int:
    """T(l, s) = min_m [m + T(l - m, s - 1) + T(m, s)], T(1, s) = 0, T(l, 1) = l (l - 1) / 2."""
    if length == 1:
        return 0
    if s == 1:
        return length * (length - 1) // 2
    return min(m + brute(length - m, s - 1) + brute(m, s) for m in range(1, length))


def test_the_closed_form_is_the_recurrence() -> None:
    for K in range(1, 13):
        for s in range(1, 7):
            assert griewank(K, s) == brute(K, s), (K, s)


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_ckpt", [False, True])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("K", [1, 2, 7])
def test_binomial_with_every_number_of_snapshots_equals_the_reference(K: int, first_order: bool,
                                                                      layer_ckpt: bool) -> None:
    """Stateful model, per-step per-element LRs, 2 tasks; layer checkpoints inside the steps or not."""
    ref = run(config(K, first_order))
    for s in range(1, K + 1):
        got = run(config(K, first_order, snapshots=s, layer_ckpt=layer_ckpt))
        assert_same(ref, got)
        assert got[4].rebuilt == list(range(K - 1, -1, -1)) * 2 and got[4].peak_held <= s  # 2 tasks


@pytest.mark.parametrize("first_order", [True, False])
def test_binomial_over_64_steps_with_every_number_of_snapshots(first_order: bool) -> None:
    """The cheap model, per-step per-tensor LRs, one task: every s first order, a spread second order (every s:
    the slow test below); the executor's counts are the optimal ones."""
    _binomial_over_64_steps(first_order, range(1, 65) if first_order else (1, 2, 3, 6, 17, 63, 64))


@pytest.mark.slow
def test_binomial_over_64_steps_second_order_with_every_number_of_snapshots() -> None:
    _binomial_over_64_steps(False, range(1, 65))


def _binomial_over_64_steps(first_order: bool, spread: range | tuple[int, ...]) -> None:
    K = 64
    kw = dict(lr_granularity="tensor")
    ref = run(config(K, first_order, **kw), Tiny, 1)
    for s in spread:
        got = run(config(K, first_order, snapshots=s, **kw), Tiny, 1)
        assert_same(ref, got)
        trace = got[4]
        assert trace.values_only == griewank(K, s) + 1 and trace.peak_held <= s, (s, trace.values_only)
        assert trace.rebuilt == list(range(K - 1, -1, -1))


@pytest.mark.parametrize("granularity", ["layer", "tensor", "element"])
@pytest.mark.parametrize("per_step", [False, True])
def test_every_lr_granularity_under_both_schedules(granularity: str, per_step: bool) -> None:
    kw = dict(lr_granularity=granularity, lr_per_step=per_step)
    ref = run(config(5, False, **kw))
    assert_same(ref, run(config(5, False, snapshots=2, **kw)))
    assert_same(ref, run(config(5, False, step_ckpt=2, step_rebuild="step", **kw)))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("K", [1, 2, 7])
def test_segments_rebuilt_one_step_at_a_time_equal_the_reference(K: int, first_order: bool) -> None:
    """Segment lengths 1..K+1: dividing K or not, and longer than K."""
    ref = run(config(K, first_order))
    for n in range(1, K + 2):
        got = run(config(K, first_order, step_ckpt=n, step_rebuild="step", layer_ckpt=n % 2 == 0))
        assert_same(ref, got)
        assert got[4].rebuilt == list(range(K - 1, -1, -1)) * 2  # 2 tasks


@pytest.mark.parametrize("schedule", [dict(snapshots=2), dict(snapshots=1), dict(step_ckpt=3, step_rebuild="step")])
def test_frozen_and_non_adapted_parameters_and_a_loss_scale(schedule: dict) -> None:
    """A frozen bias passes through; adapt_last=1 leaves parameters that need a meta-gradient unadapted;
    the inner gradients of a scaled loss are unscaled by hand (the fp16 path)."""
    kw = dict(adapt_last=1, lr_granularity="tensor")
    ref = run(config(5, False, **kw), loss_scale=64.0, frozen=True)
    got = run(config(5, False, **kw, **schedule), loss_scale=64.0, frozen=True)
    assert_same(ref, got)
    assert "w.head.bias" not in got[0] and got[0]["w.inp.weight"].abs().max() > 0


# -- optimality -----------------------------------------------------------------------------------
def test_the_executor_runs_the_fewest_recomputations_and_holds_at_most_s_snapshots() -> None:
    """For K <= 12 and s <= 6: values-only steps = Griewank's minimum + the output step; every step rebuilt once."""
    for K in range(1, 13):
        for s in range(1, 7):
            with traced() as trace:
                run(config(K, True, snapshots=s, learn_lr=False), Tiny, 1)
            assert trace.values_only == griewank(K, min(s, K)) + 1 == binomial(K, s).values_only(), (K, s)
            assert trace.rebuilt == list(range(K - 1, -1, -1)) and trace.peak_held <= s, (K, s, trace)


def test_one_step_rebuild_counts() -> None:
    """K values-only steps in the forward, L - 1 more per segment of L steps to rebuild in the backward (the
    last segment's last step is the pending one); at most K/n segment inputs + n - 2 inside one segment held."""
    for K in range(1, 13):
        for n in range(1, K + 2):
            with traced() as trace:
                run(config(K, True, step_ckpt=n, step_rebuild="step", learn_lr=False), Tiny, 1)
            lengths = [min(b + n, K) - b for b in range(0, K, n)]
            lengths[-1] -= 1
            assert trace.values_only == K + sum(max(L - 1, 0) for L in lengths), (K, n)
            assert trace.peak_held <= math.ceil(K / n) + max(n - 2, 0), (K, n, trace)
            assert trace.rebuilt == list(range(K - 1, -1, -1))


def test_a_schedule_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="rebuilds must run"):
        Schedule(2, (Store(0), Advance(0, 1)), (Rebuild(1), Load(0, True), Advance(0, 1)))
    with pytest.raises(ValueError, match="working state at"):
        Schedule(3, (Store(0), Advance(0, 2)), (Rebuild(1), Rebuild(0)))
    with pytest.raises(ValueError, match="not held"):
        Schedule(2, (Advance(0, 1),), (Rebuild(1), Load(0, True), Rebuild(0)))
    assert one_step_segments(5, 2).max_held() == 2 and binomial(64, 6).max_held() == 6


# -- configuration --------------------------------------------------------------------------------
def test_configuration() -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        MetaConfig(inner_steps=4, snapshots=2, step_ckpt=1)
    with pytest.raises(ConfigError, match="segment, step"):
        MetaConfig(inner_steps=4, step_ckpt=1, step_rebuild="steps")
    with pytest.raises(ConfigError, match="needs step_ckpt"):
        MetaConfig(inner_steps=4, step_rebuild="step")
    with pytest.raises(ConfigError, match="snapshots must be"):
        MetaConfig(inner_steps=4, snapshots=-1)
    with pytest.raises(ConfigError, match="vectorize cannot"):
        MetaConfig(inner_steps=4, snapshots=2, vectorize=True)
    assert MetaConfig(inner_steps=4, snapshots=2).reference() == MetaConfig(inner_steps=4)
    assert MetaConfig(inner_steps=4, step_ckpt=2, step_rebuild="step").reference() == MetaConfig(inner_steps=4)
    reg = registry()
    assert {"bckpt", "bckpt_lr", "bckpt_fo", "bckpt_lr_fo", "ckpt_bckpt_lr"} <= set(reg)
    for K, s in ((1, 1), (2, 1), (3, 2), (8, 3), (9, 4), (64, 6)):
        assert reg["bckpt_lr"].config(inner_steps=K).snapshots == s
    assert reg["bckpt"].reference().config(inner_steps=8) == reg["maml"].config(inner_steps=8)
    v = variant_for(Cell("bckpt", "cpu-bench", settings={"snapshots": 5}))
    assert v.config(inner_steps=8).snapshots == 5
    v = variant_for(Cell("sckpt", "cpu-bench", settings={"step_ckpt": 4, "step_rebuild": "step"}))
    assert v.config(inner_steps=8).step_rebuild == "step"


def test_a_second_backward_is_refused_in_one_line() -> None:
    torch.manual_seed(0)
    learner = MetaLearner(Tiny().double(), config(3, False, snapshots=2), nn.functional.mse_loss)
    (task,) = tasks_for(Tiny, 1)
    loss = learner.task_loss(task)
    params = list(learner.meta_parameters().values())
    torch.autograd.grad(loss, params, retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        torch.autograd.grad(loss, params)


# -- memory ---------------------------------------------------------------------------------------
def _peak(variant: str, K: int, **replaced) -> float:
    exp = small_experiment(variant, "cpu-bench", dtype="float32", inner_steps=K)
    if replaced:
        exp.learner.cfg = replace(exp.learner.cfg, **replaced)
    step = StepRunner(exp.learner, 1e-3, exp.sample)
    return measure_cpu_memory(step, exp.sample()[:1])["cpu_peak_alloc_mib"] * 2 ** 20


def test_the_binomial_peak_grows_far_slower_with_the_steps_than_one_copy_per_step() -> None:
    """cpu-bench at width 16, depth 2 (weights dominate), float32, one task, K = 8 -> 64: sckpt keeps one weight
    copy per step (56 more); binomial with ceil(log2 K) snapshots 3 more (3 -> 6; measured: exactly 3 copies);
    with learnable LRs no more (the values-only steps are detached one by one).  Generous margins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exp = small_experiment("sckpt", "cpu-bench", dtype="float32", inner_steps=1)
        copy = sum(p.numel() * p.element_size() for p in exp.learner.parameters())
        sckpt = {K: _peak("sckpt", K) for K in (8, 64)}
        bckpt = {K: _peak("bckpt", K) for K in (8, 64)}
        bckpt_lr = _peak("bckpt_lr", 64)
    finally:
        torch.set_num_threads(before)
    assert sckpt[64] - sckpt[8] >= 40 * copy, (sckpt, copy)
    assert bckpt[64] - bckpt[8] <= 5 * copy and bckpt_lr <= bckpt[64] + copy, (bckpt, bckpt_lr, copy)
    assert bckpt[64] - bckpt[8] <= 0.2 * (sckpt[64] - sckpt[8]) and bckpt[64] < 0.5 * sckpt[64]
