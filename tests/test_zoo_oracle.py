"""Claim: for every model in the zoo (tests/zoo/models.py) and every registered variant, the engine's
meta-gradients (initial weights and learnable LRs), query loss and final buffers equal an independent
from-scratch MAML (tests/zoo/oracle.py) in float64 to 1e-12, with non-uniform random LRs per layer, per
tensor, per element and per step.  A variant is skipped only where it refuses a model with a ConfigError.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness.variants import registry
from tests.zoo.models import ZOO, mse
from tests.zoo.oracle import build_learner, compare, oracle_lr_raw, refusal, run_engine, run_oracle

torch.set_num_threads(1)

TOL = 1e-12
K = 3
# (LR granularity, per-step LRs) for the learnable-LR variants, cycled over the zoo so that every
# combination meets several models.
SETTINGS = [("layer", False), ("tensor", True), ("element", False), ("layer", True), ("tensor", False),
            ("element", True)]


def setting(model_name: str) -> tuple[str, bool]:
    return SETTINGS[list(ZOO).index(model_name) % len(SETTINGS)]


def build(model_name: str):
    entry = ZOO[model_name]
    torch.manual_seed(0)
    model = entry.build().double()
    tasks = entry.tasks(torch.Generator().manual_seed(list(ZOO).index(model_name)))
    return model, tasks, entry.adapt_last


def check_against_oracle(model_name: str, variant, inner_steps: int = K) -> dict[str, float]:
    granularity, per_step = setting(model_name)
    if variant.learn_lr and per_step:
        variant = replace(variant, lr_per_step=True)
    model, tasks, adapt_last = build(model_name)
    try:
        learner = build_learner(variant, model, mse, inner_steps=inner_steps, granularity=granularity,
                                adapt_last=adapt_last)
        lr_raw = oracle_lr_raw(learner, granularity)
        oracle = run_oracle(model, tasks, mse, inner_steps=inner_steps, first_order=variant.first_order,
                            lr_raw=lr_raw, granularity=granularity, per_step=variant.lr_per_step,
                            adapt_last=adapt_last)
        engine = run_engine(learner, tasks)
    except Exception as exc:  # noqa: BLE001 - only a ConfigError is a refusal
        reason = refusal(exc)
        if reason is None:
            raise
        pytest.skip(f"{variant.name} refuses {model_name}: {reason}")
    return compare(engine, oracle, granularity)


# the exact estimator: truncated, implicit and reptile approximate it (tests/test_estimators.py: their closed forms;
# tests/test_engine_agreement.py: each checkpointed estimator equals its non-checkpointed self)
EXACT = [n for n, v in registry().items() if v.estimator == "exact"]


@pytest.mark.parametrize("variant_name", EXACT)
@pytest.mark.parametrize("model_name", list(ZOO))
def test_meta_gradients_equal_the_independent_oracle(model_name: str, variant_name: str) -> None:
    err = check_against_oracle(model_name, registry()[variant_name])
    assert err["loss"] <= TOL and err["buffers"] <= TOL, err
    assert err["w"] <= TOL and err["lr"] <= TOL, err


STATEFUL = ["dropout", "user_buffer_layer", "spectral_norm_hook", "batchnorm_momentum_none", "frozen",
            "lstm_tuple_state", "unused", "dunder_names", "own_generator", "torch_ckpt_stateful"]


@pytest.mark.parametrize("segment", [2, 4])
@pytest.mark.parametrize("model_name", STATEFUL)
def test_step_segments_that_do_not_divide_the_steps_equal_the_oracle(model_name: str, segment: int) -> None:
    """K = 5 inner steps in segments of 2 (2+2+1) or 4 (4+1), every step-checkpointed variant."""
    stepped = [v for v in map(registry().get, EXACT) if v.step_ckpt > 0]
    assert stepped, "no step-checkpointed variant registered"
    for variant in stepped:
        err = check_against_oracle(model_name, replace(variant, step_ckpt=segment), inner_steps=5)
        assert max(err.values()) <= TOL, (variant.name, err)


@pytest.mark.parametrize("segment", [2, 4])
@pytest.mark.parametrize("model_name", STATEFUL)
def test_step_segments_rebuilt_one_step_at_a_time_equal_the_oracle(model_name: str, segment: int) -> None:
    """K = 5 in segments of 2 or 4, each rebuilt one step at a time (``step_rebuild="step"``)."""
    for variant in [v for v in map(registry().get, EXACT) if v.step_ckpt > 0]:
        err = check_against_oracle(model_name, replace(variant, step_ckpt=segment, step_rebuild="step"), inner_steps=5)
        assert max(err.values()) <= TOL, (variant.name, err)


@pytest.mark.parametrize("snapshots", [1, 2])
@pytest.mark.parametrize("model_name", STATEFUL)
def test_binomial_with_few_snapshots_equals_the_oracle(model_name: str, snapshots: int) -> None:
    """K = 5 with 1 or 2 stored states: most steps recomputed from a snapshot, every binomial variant."""
    binomial = [v for v in map(registry().get, EXACT) if v.snapshots]
    assert binomial, "no binomial variant registered"
    for variant in binomial:
        err = check_against_oracle(model_name, replace(variant, snapshots=snapshots), inner_steps=5)
        assert max(err.values()) <= TOL, (variant.name, err)
