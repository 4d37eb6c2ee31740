"""Claim: every variant's meta-gradients (initial weights and LRs) equal the
non-checkpointed reference of the same variant, in float64, to 1e-12 --
on three model families, for every LR granularity, per-step LRs and step checkpointing.
(Only variants whose reference differs -- checkpointed or vectorized; the others are their own
reference, and tests/test_zoo_oracle.py checks every variant against an independent MAML.)"""
from __future__ import annotations

from dataclasses import replace

import pytest

from harness.core.engine import MetaLearner
from harness.loop.agreement import check_agreement
from harness.variants import CANONICAL, registry
from tests.conftest import small_experiment

ALL = list(registry())
CHECKPOINTED = [n for n in ALL if registry()[n].config() != registry()[n].config().reference()]


@pytest.mark.parametrize("preset", ["quick", "conv4", "cpu-bench"])
@pytest.mark.parametrize("variant", CHECKPOINTED)
def test_checkpointed_meta_gradients_equal_reference(variant: str, preset: str) -> None:
    # vectorized variants refuse BatchNorm (harness.core.vectorized): their conv4 uses GroupNorm
    norm = {"norm": "group"} if preset == "conv4" and registry()[variant].vectorize else {}
    exp = small_experiment(variant, preset, inner_steps=3, **norm)
    assert exp.learner.cfg != exp.learner.cfg.reference()  # a real comparison, not the learner against itself
    agree = check_agreement(exp, exp.sample())
    assert agree["w_rel_err"] <= 1e-12
    if exp.variant.learn_lr:
        assert agree["lr_rel_err"] <= 1e-12
    else:
        assert agree["lr_rel_err"] is None


@pytest.mark.parametrize("granularity", ["layer", "tensor", "element"])
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("variant", ["ckpt_lr", "ckpt_lr_fo", "sckpt_lr", "ckpt_sckpt_lr"])
def test_lr_granularities_agree_under_checkpointing(variant: str, granularity: str, per_step: bool) -> None:
    exp = small_experiment(variant, "cpu-bench", inner_steps=3)
    cfg = replace(exp.learner.cfg, lr_granularity=granularity, lr_per_step=per_step)
    exp.learner = MetaLearner(exp.learner.model, cfg, exp.learner.loss_fn)
    agree = check_agreement(exp, exp.sample())
    assert agree["w_rel_err"] <= 1e-12 and agree["lr_rel_err"] <= 1e-12


@pytest.mark.parametrize("segment", [2, 3, 5])
def test_step_checkpoint_segments_agree(segment: int) -> None:
    exp = small_experiment("ckpt_sckpt_lr", "quick", inner_steps=4)
    exp.learner.cfg = replace(exp.learner.cfg, step_ckpt=segment)
    agree = check_agreement(exp, exp.sample())
    assert agree["w_rel_err"] <= 1e-12 and agree["lr_rel_err"] <= 1e-12


def test_the_eight_canonical_variants_are_registered_with_their_flags() -> None:
    reg = registry()
    assert list(reg)[:8] == list(CANONICAL)
    for name in CANONICAL:
        v = reg[name]
        assert ("ckpt" in name) == v.layer_ckpt and ("lr" in name) == v.learn_lr and name.endswith("fo") == v.first_order
