"""Claim: the ablation's statistics take the training seed as the unit (a seed's score is its mean over the
held-out tasks), so intervals widen when seeds disagree even if the task spread is unchanged; quantiles
come from scipy.stats; the bootstrap is reproducible; and several effects are Holm-corrected, so a
verdict says "better" only when the corrected interval excludes zero."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.studies.ablation.spec import AblationSpec, plan
from harness.studies.ablation.stats import bootstrap_interval, effect_tests, holm, t_interval, t_pvalue
from harness.studies.ablation.summary import METRICS, effects, variant_rows

SEEDS, TASKS = 10, 100


def cells_from(per_task: dict[str, np.ndarray]) -> dict:
    """Stored-cell stand-ins: per variant a (seeds x tasks) matrix of final meta-test losses."""
    return {(name, s): {"status": "ok", "test_loss": m[s].tolist(), "train_loss": [1.0], "wall_s": 1.0}
            for name, m in per_task.items() for s in range(m.shape[0])}


def synthetic(seed_offsets: np.ndarray) -> dict:
    """fo is 0.1 worse than maml on average, with the same task noise (sd 0.5) whatever the seed offsets."""
    rng = np.random.default_rng(1)
    maml = 1.0 + rng.normal(0.0, 0.5, (SEEDS, TASKS))
    noise = rng.normal(0.0, 0.5, (SEEDS, TASKS))
    fo = maml + 0.1 + seed_offsets[:, None] + noise
    return cells_from({"maml": maml, "fo": fo})


def order_effect(cells: dict) -> dict:
    spec = AblationSpec(preset="quick", variants=("maml", "fo"), seeds=SEEDS, eval_tasks=TASKS)
    (effect,) = effects(spec, plan(spec), cells, METRICS[:1])
    return effect


def test_intervals_widen_when_seeds_disagree_and_task_spread_is_unchanged() -> None:
    agree = synthetic(np.zeros(SEEDS))
    disagree = synthetic(0.5 * np.array([1, -1] * (SEEDS // 2), dtype=float))  # mean 0: same mean effect
    a, d = order_effect(agree), order_effect(disagree)
    assert a["mean_diff"] == pytest.approx(d["mean_diff"]) and a["mean_diff"] == pytest.approx(-0.1, abs=0.05)
    assert a["seeds"] == d["seeds"] == SEEDS
    assert (d["t_high"] - d["t_low"]) > 5 * (a["t_high"] - a["t_low"])
    assert a["t_high"] < 0 and a["significant"] and a["verdict"].startswith("maml better")
    assert d["t_low"] < 0 < d["t_high"] and not d["significant"] and d["verdict"].startswith("no difference")
    assert d["boot_low"] < 0 < d["boot_high"]
    # pooling the (seed, task) pairs as if independent would call the disagreeing case significant
    pooled = t_interval(np.array([disagree[("maml", s)]["test_loss"] for s in range(SEEDS)]).ravel()
                        - np.array([disagree[("fo", s)]["test_loss"] for s in range(SEEDS)]).ravel())
    assert pooled.high < 0 and pooled.n == SEEDS * TASKS


def test_variant_rows_are_over_seed_means() -> None:
    m = np.arange(SEEDS * TASKS, dtype=float).reshape(SEEDS, TASKS)
    spec = AblationSpec(preset="quick", variants=("maml",), seeds=SEEDS, eval_tasks=TASKS)
    (row,) = variant_rows(spec, plan(spec), cells_from({"maml": m}), METRICS[:1])
    expected = t_interval(m.mean(axis=1))
    assert row["seeds"] == SEEDS and (row["test_loss_t_low"], row["test_loss_t_high"]) == (expected.low, expected.high)


def test_t_interval_uses_the_student_quantile() -> None:
    x = [1.0, 2.0, 3.0]
    ci = t_interval(x)
    assert ci.mean == 2.0 and ci.high - 2.0 == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert t_interval(np.ones(10) + np.arange(10)).high - 5.5 == pytest.approx(
        sps.t.ppf(0.975, 9) * np.std(np.arange(10), ddof=1) / math.sqrt(10))
    assert math.isnan(t_interval([1.0]).low) and math.isnan(t_interval([1.0, math.nan]).low)


def test_bootstrap_is_reproducible_and_brackets_the_mean() -> None:
    x = np.random.default_rng(3).normal(size=10)
    a, b = bootstrap_interval(x), bootstrap_interval(x)
    assert a == b and a.low < x.mean() < a.high
    assert bootstrap_interval(x, seed=1) != a


def test_holm_adjusts_step_down() -> None:
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert math.isnan(holm([math.nan, 0.02])[0]) and holm([math.nan, 0.02])[1] == pytest.approx(0.02)


def test_a_verdict_needs_the_holm_corrected_interval_to_exclude_zero() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=SEEDS)
    base = (base - base.mean()) / base.std(ddof=1)
    # mean chosen so that the plain two-sided p is about 0.03: significant alone, not among 4 effects
    shift = sps.t.ppf(1 - 0.015, SEEDS - 1) / math.sqrt(SEEDS)
    diffs = [base + shift] + [base + 0.05 * k for k in range(3)]
    tests = effect_tests(diffs)
    first = tests[0]
    assert first.p == pytest.approx(0.03, rel=1e-6) and t_pvalue(diffs[0]) == first.p
    assert first.t.low > 0  # the uncorrected 95% interval excludes 0 ...
    assert first.holm_level == pytest.approx(1 - 0.05 / 4) and first.holm.low < 0  # ... Holm's does not
    assert not first.significant and first.p_holm == pytest.approx(0.12, rel=1e-6)
    alone = effect_tests(diffs[:1])[0]
    assert alone.significant and alone.holm_level == pytest.approx(0.95)
