"""Statistics with the training seed as the unit of replication.

A training run (one seed: one initialisation, one task stream) is one observation: its score is the
mean over the held-out tasks, and intervals come from the per-seed scores, not from the pooled
(seed, task) pairs, which measure task-to-task spread instead of run-to-run spread.  Effects are
paired per seed (same initialisation, same held-out tasks).  Quantiles come from ``scipy.stats``;
several effects tested at once are corrected with Holm's step-down procedure.  Why these choices:
docs/ablation.md, "Statistics".
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats

__all__ = ["ALPHA", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "EffectTest", "Interval", "bootstrap_interval",
           "effect_tests", "holm", "seed_scores", "t_interval", "t_pvalue"]

ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the bootstrap's generator is fixed, so a table is reproducible to the digit


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int


def _finite(values: Sequence[float]) -> np.ndarray | None:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x if len(x) >= 2 and np.isfinite(x).all() else None


def seed_scores(per_task: Sequence[Sequence[float]]) -> np.ndarray:
    """One score per seed: the mean over its held-out tasks (rows are seeds)."""
    return np.array([float(np.mean(row)) for row in per_task])


def t_interval(values: Sequence[float], level: float = 1 - ALPHA) -> Interval:
    """Mean and Student-t interval over the values (``scipy.stats.t``); NaN bounds below 2 finite values."""
    raw = np.asarray(values, dtype=np.float64).ravel()
    mean = float(raw.mean()) if len(raw) else math.nan
    x = _finite(raw)
    if x is None:
        return Interval(mean, math.nan, math.nan, len(raw))
    sem = float(stats.sem(x))
    if sem == 0.0:
        return Interval(mean, mean, mean, len(x))
    low, high = stats.t.interval(level, df=len(x) - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), len(x))


def t_pvalue(values: Sequence[float]) -> float:
    """Two-sided one-sample t-test of mean 0 (paired differences over seeds); NaN below 2 finite values."""
    x = _finite(values)
    if x is None:
        return math.nan
    if float(np.std(x)) == 0.0:
        return 1.0 if float(x[0]) == 0.0 else 0.0
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def bootstrap_interval(values: Sequence[float], level: float = 1 - ALPHA,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """Percentile bootstrap of the mean over the values (seeds resampled), with a fixed generator."""
    raw = np.asarray(values, dtype=np.float64).ravel()
    mean = float(raw.mean()) if len(raw) else math.nan
    x = _finite(raw)
    if x is None:
        return Interval(mean, math.nan, math.nan, len(raw))
    res = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), len(x))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, family-wise error rate); NaN p-values stay NaN and are not counted."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, running, out = len(idx), 0.0, [math.nan] * len(pvalues)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


class EffectTest(NamedTuple):
    """A paired effect over seeds: plain 95% t and bootstrap intervals, and the Holm-corrected decision.

    ``holm_level`` is the confidence level Holm's procedure uses at this effect's step
    (1 - alpha / (m - rank)); ``holm`` is the t-interval at that level; ``significant`` is
    Holm-adjusted p < alpha, which implies that ``holm`` excludes 0.
    """

    t: Interval
    bootstrap: Interval
    p: float
    p_holm: float
    holm_level: float
    holm: Interval
    significant: bool


def effect_tests(diffs: Sequence[Sequence[float]], alpha: float = ALPHA) -> list[EffectTest]:
    """One :class:`EffectTest` per effect from its per-seed paired differences; Holm over all of them."""
    ps = [t_pvalue(d) for d in diffs]
    adjusted = holm(ps)
    valid = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    rank = {i: r for r, i in enumerate(valid)}
    out = []
    for i, d in enumerate(diffs):
        level = 1 - alpha / (len(valid) - rank[i]) if i in rank else math.nan
        holm_ci = t_interval(d, level) if i in rank else t_interval([])
        out.append(EffectTest(t_interval(d, 1 - alpha), bootstrap_interval(d, 1 - alpha), ps[i], adjusted[i],
                              level, holm_ci, bool(adjusted[i] < alpha)))
    return out
