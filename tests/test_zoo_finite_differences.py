"""Claim: for every second-order registered variant, the meta-gradient the engine returns is the derivative
of the meta-loss it computes: central finite differences in float64 (tests/zoo/oracle.py,
``finite_difference_error``: step 1e-5, two random directions over all initial weights and raw LRs) agree
to 1e-7 relative, for K = 5 inner steps (K = 1 on one model of each kind, K1_MODELS) and step-checkpoint segments of 2 (which does not divide 5: segments 2, 2, 1);
binomial variants with 2 stored states (K = 5: steps recomputed from a snapshot).  K = 3 (segments 2, 1) was
dropped from `make test` for time: it exercised no code path that K = 5 does not, and the engine equals the
independent oracle at K = 3 in tests/test_zoo_oracle.py.

Excluded zoo models, and why: spectral norm (hook and parametrization) and the user's running-centre layer
update their buffers under ``no_grad`` from the weights (power iteration, running mean; so does the
running-centre layer under torch's checkpoint in ``torch_ckpt_stateful``), and
``nn.Embedding(max_norm=...)`` rescales its weight rows in place under ``no_grad``; autograd treats those
updates as constants by design (torch documents it for max_norm), finite differences do not, so the two
differ by construction.  Each still equals the independent oracle (tests/test_zoo_oracle.py).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness.variants import registry
from tests.zoo.models import ZOO, mse
from tests.zoo.oracle import build_learner, finite_difference_error, refusal

torch.set_num_threads(1)

TOL = 1e-7
NOT_DIFFERENTIABLE_BY_DESIGN = {"spectral_norm_hook", "spectral_norm_parametrize", "user_buffer_layer",
                                "embedding_max_norm", "torch_ckpt_stateful"}
MODELS = [m for m in ZOO if m not in NOT_DIFFERENTIABLE_BY_DESIGN]
SECOND_ORDER = [n for n, v in registry().items()  # the exact ones: the other estimators approximate it
                if not v.first_order and v.estimator == "exact"]


# Open gaps, with the relative FD errors this test measured.  The engine agrees with the independent oracle
# to 1e-12 on all of them, so the discrepancy is shared.  Weight norm is a PyTorch bug, not ours:
# ``torch._weight_norm``'s double backward is wrong in torch 2.14.1 (``gradgradcheck`` fails on it while the
# same formula written out, ``v * g / |v|``, passes; tests/test_upstream.py pins this), so every second-order
# MAML through ``parametrizations.weight_norm`` gets a wrong meta-gradient, whatever the library.
WEIGHT_NORM = "torch._weight_norm's double backward is wrong upstream (tests/test_upstream.py)"
OPEN_GAPS = {
    ("parametrize_symmetric_weight_norm", 1): f"1e-2 for every variant, maml included: {WEIGHT_NORM}",
    ("parametrize_symmetric_weight_norm", 5): f"2e-2 for every variant, maml included: {WEIGHT_NORM}",
}
NOT_STRICT: set[tuple[str, int]] = set()
# BatchNorm on 6-sample batches is strongly curved: at h = 1e-5 the central difference's truncation error
# (h^2 |L'''| / 6) reached 3e-7 (conv_batchnorm, K=3), 1.4e-6 (K=5) and 5e-8 (batchnorm_momentum_none, K=5)
# for the worst variant; at h = 1e-6 the same cases gave 3.1e-9, 1.4e-8 and 5.9e-10 -- 100x smaller, the
# h^2 law, so the gap was the step, not the gradient.  Rounding at h = 1e-6 is about 1e-10.  The same for a
# gain read through self.parameters() (parameters_iterated_in_forward, K=5): 1.6e-7 at h = 1e-5, identical for
# lr, ckpt_sckpt_lr and vlr (the engine equals the oracle to 1e-12 there), below 1e-7 at h = 1e-6.
FD_STEP = {"conv_batchnorm": 1e-6, "batchnorm_momentum_none": 1e-6, "parameters_iterated_in_forward": 1e-6}
# K = 1 (one step: the segment of 2 and the 2 snapshots longer than the run) is a schedule edge, not a model's: one
# model of each kind runs it -- plain, BatchNorm buffers, LSTM state, the harness's and torch's checkpoints, and a
# partly adapted model; every model runs K = 5, which takes every path K = 1 takes inside a step.
K1_MODELS = ("tied", "conv_batchnorm", "lstm_tuple_state", "nested_checkpoints", "torch_ckpt_reentrant",
             "adapt_last_2")
CASES = [pytest.param(m, k, marks=pytest.mark.xfail(reason=OPEN_GAPS[(m, k)], strict=(m, k) not in NOT_STRICT))
         if (m, k) in OPEN_GAPS else (m, k) for m in MODELS for k in (1, 5) if k == 5 or m in K1_MODELS]


@pytest.mark.parametrize(("model_name", "inner_steps"), CASES)
def test_second_order_meta_gradients_match_finite_differences(model_name: str, inner_steps: int) -> None:
    entry = ZOO[model_name]
    granularities = ["layer", "element", "tensor"]
    failures = {}
    for i, name in enumerate(SECOND_ORDER):
        variant = registry()[name]
        if variant.step_ckpt:
            variant = replace(variant, step_ckpt=2)
        if variant.snapshots:
            variant = replace(variant, snapshots=2)
        torch.manual_seed(0)
        model = entry.build().double()
        tasks = entry.tasks(torch.Generator().manual_seed(11))
        try:
            learner = build_learner(variant, model, mse, inner_steps=inner_steps,
                                    granularity=granularities[i % 3], adapt_last=entry.adapt_last)
            err = finite_difference_error(learner, tasks, h=FD_STEP.get(model_name, 1e-5))
        except Exception as exc:  # noqa: BLE001 - only a ConfigError is a refusal
            if refusal(exc) is None:
                raise
            continue
        if not err <= TOL:
            failures[name] = err
    assert not failures, failures
