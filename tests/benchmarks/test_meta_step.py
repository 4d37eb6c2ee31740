"""Per-variant meta-step benchmarks (pytest-benchmark): numbers to look at, not timed assertions.

Skipped in the test suite (tests/benchmarks/conftest.py); run them with

    make bench-micro                                                       # the table
    HARNESS_BENCH_MICRO=1 .venv/bin/python -m pytest tests/benchmarks --benchmark-autosave   # keep it in .benchmarks/

The one assertion besides a finite loss: the configuration timed computes its variant's meta-gradient, equal to
the non-checkpointed reference's (``check_agreement``) before it is timed.  No timing thresholds.

A meta-step is ``MetaLearner.step(tasks)`` plus the Adam step (``harness.loop.train.StepRunner``),
on a shrunken cpu-bench configuration so the whole suite stays quick on 2 cores.
"""
from __future__ import annotations

import math

import pytest

from harness.loop.agreement import check_agreement
from harness.loop.spec import Experiment, RunSpec
from harness.loop.train import StepRunner
from harness.variants import registry

TOL = 1e-5  # float32: a checkpointed or vectorized meta-gradient against the plain one


@pytest.mark.parametrize("variant", list(registry()))
def test_meta_step(benchmark, variant: str) -> None:
    exp = Experiment(RunSpec(variant=variant, preset="cpu-bench", meta_batch=1),
                     model_overrides={"width": 16, "depth": 2}, task_overrides={"sequences": 2, "tokens": 8})
    step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample)
    tasks = exp.sample()
    agree = check_agreement(exp, tasks)
    assert agree["w_rel_err"] <= TOL and (agree["lr_rel_err"] is None or agree["lr_rel_err"] <= TOL), agree
    benchmark.extra_info.update(variant=variant, **exp.variant.flags)
    loss = benchmark.pedantic(step, args=(tasks,), rounds=3, iterations=1, warmup_rounds=1)
    assert math.isfinite(loss)  # not NaN or inf
