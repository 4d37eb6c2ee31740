"""Per-variant meta-step benchmarks (pytest-benchmark): numbers to look at, not timed assertions.

    .venv/bin/python -m pytest tests/benchmarks --benchmark-only          # the table
    .venv/bin/python -m pytest tests/benchmarks --benchmark-autosave      # keep it in .benchmarks/

A meta-step is ``MetaLearner.step(tasks)`` plus the Adam step (``harness.loop.train.StepRunner``),
on a shrunken cpu-bench configuration so the whole suite stays quick on 2 cores.
"""
from __future__ import annotations

import math

import pytest

from harness.loop.spec import Experiment, RunSpec
from harness.loop.train import StepRunner
from harness.variants import registry


@pytest.mark.parametrize("variant", list(registry()))
def test_meta_step(benchmark, variant: str) -> None:
    exp = Experiment(RunSpec(variant=variant, preset="cpu-bench", meta_batch=1),
                     model_overrides={"width": 16, "depth": 2}, task_overrides={"sequences": 2, "tokens": 8})
    step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample)
    tasks = exp.sample()
    benchmark.extra_info.update(variant=variant, **exp.variant.flags)
    loss = benchmark.pedantic(step, args=(tasks,), rounds=3, iterations=1, warmup_rounds=1)
    assert math.isfinite(loss)  # not NaN or inf (the only assertion: no timing thresholds)
