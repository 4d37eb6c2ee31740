"""The memory planner (issue 22, ``--memory-budget``): the cost model on hand-computed values, the choice (fits,
fastest predicted), the impossible budget (exit 2, the smallest peak named, nothing written), predicted against
measured peaks on ``cpu-bench`` (generous bounds: a benchmark-type figure; the real ones are in the report and
docs/checkpointing.md), bad budget strings, and what the rows record.

    python -m pytest -q tests/test_planner.py
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.conftest import FAST, TINY, cli
from harness.bench.cells import Cell
from harness.bench.child import measure_cell_inline
from harness.bench.measure import measure_cpu_memory
from harness.bench import planner
from harness.bench.planner import plan_cells, plan_experiment, plan_learner, probe_costs
from harness.core.config import ConfigError, MetaConfig
from harness.core.engine import MetaLearner
from harness.core.plan import (Candidate, Prediction, StepCosts, VectorCosts, candidates, choose, predict,
                               segment_copies, weight_copies)
from harness.core.schedules import binomial, one_step_segments
from harness.loop.spec import Experiment, RunSpec
from harness.loop.train import StepRunner
from harness.settings import parse_memory
from harness.variants import get_variant

MIB = 2 ** 20
COSTS = StepCosts(plain_first=10.0, step_slope=4.0, sched_first=8.0, weights=1.0, graph_s=0.1, values_s=0.05,
                  base_s=0.2)
BOTH = {False: COSTS, True: replace(COSTS, plain_first=9.0, sched_first=7.5, graph_s=0.15)}


# -- the cost model, exact small values ----------------------------------------------------------------------
def test_no_step_checkpointing_grows_by_the_step_slope() -> None:
    p = predict(Candidate(), BOTH, steps=4)
    assert (p.peak_mib, p.time_s) == pytest.approx((10 + 3 * 4, 0.2 + 4 * 0.1))


def test_segments_hold_the_later_inputs_and_one_segments_graphs() -> None:
    # K = 4, n = 2: segment 0 rebuilds 2 steps (1 slope), segment 1 also holds its input: 1 + 4 copies of W
    p = predict(Candidate(step_ckpt=2), BOTH, steps=4)
    assert (p.peak_mib, p.time_s) == pytest.approx((8 + 1 + 4, 0.2 + 4 * 0.1 + 4 * 0.05))
    assert predict(Candidate(step_ckpt=1), BOTH, steps=4).peak_mib == pytest.approx(8 + 3)  # K - 1 inputs
    assert segment_copies(5, 2, 4.0) == pytest.approx(max(0 + 4, 1 + 4, 2 + 0))  # the short last segment


def test_binomial_counts_its_copies_and_revolves_recomputation() -> None:
    # K = 4, s = 1: a values-only step's input and output (2 copies); Revolve: 7 values-only evaluations
    p = predict(Candidate(snapshots=1), BOTH, steps=4)
    assert (p.peak_mib, p.time_s) == pytest.approx((8 + 2 * 1, 0.2 + 4 * 0.1 + 7 * 0.05))
    assert predict(Candidate(True, snapshots=1), BOTH, steps=4).peak_mib == pytest.approx(7.5 + 2)


def test_weight_copies_are_the_ones_measured_on_cpu_bench() -> None:
    """Counts read off the CPU figure (lr, cpu-bench, K = 4, 8, 32): (peak - one-step peak) / W."""
    assert [weight_copies(binomial(8, s)) for s in (1, 2, 3, 4)] == [2, 3, 4, 4]
    assert [weight_copies(binomial(4, s)) for s in (1, 2, 3, 4)] == [2, 2, 3, 3]
    assert [weight_copies(binomial(32, s)) for s in (2, 3, 5)] == [3, 4, 6]
    assert [weight_copies(one_step_segments(8, n)) for n in (2, 4)] == [4, 4]
    assert [weight_copies(one_step_segments(4, n)) for n in (2, 4)] == [2, 3]
    assert weight_copies(one_step_segments(32, 5)) == 10


def test_first_order_copies_and_the_measured_segment_slope() -> None:
    """First order (lr_fo, cpu-bench, K = 8, measured): no new adjoint per rebuild, one state per advance."""
    assert [weight_copies(binomial(8, s), first_order=True) for s in (1, 2, 3)] == [1, 2, 3]
    assert [weight_copies(one_step_segments(8, n), first_order=True) for n in (2, 4)] == [4, 3]
    # a segment's extra steps cost segment_slope (measured), not step_slope, when the probe gives it
    assert predict(Candidate(step_ckpt=2), {False: replace(COSTS, segment_slope=2.0)}, steps=4).peak_mib == (
        pytest.approx(8 + max(0 + 2, 1 + 2)))


def test_per_step_lrs_add_their_gradient_per_step() -> None:
    costs = {False: replace(COSTS, lr_step=0.5)}
    assert predict(Candidate(), costs, steps=4).peak_mib == pytest.approx(10 + 3 * 4 + 3 * 0.5)
    assert predict(Candidate(snapshots=1), costs, steps=4).peak_mib == pytest.approx(8 + 2 + 3 * 0.5)


def test_vectorized_peak_is_bilinear_in_steps_and_chunk() -> None:
    costs = VectorCosts({(1, 1): 10.0, (2, 1): 14.0, (1, 2): 16.0, (2, 2): 24.0}, chunk_s=0.1, task_s=0.01)
    p = predict(Candidate(vmap_chunk=2), costs, steps=3, meta_batch=4)
    assert p.peak_mib == pytest.approx(10 + 2 * 4 + 1 * 6 + 2 * 1 * 4)
    assert p.time_s == pytest.approx(3 * (2 * 0.1 + 4 * 0.01))


def test_candidates_are_exact_configurations_only() -> None:
    got = candidates(8)
    assert Candidate() in got and Candidate(True, snapshots=3) in got and Candidate(step_ckpt=8) in got
    for c in got:  # each one a valid MetaConfig: the planner only chooses among schedules that exist
        MetaConfig(inner_steps=8, layer_ckpt=c.layer_ckpt, step_ckpt=c.step_ckpt, step_rebuild=c.step_rebuild,
                   snapshots=c.snapshots)
    assert candidates(3, vectorized=True, meta_batch=3) == [Candidate(vmap_chunk=c) for c in (1, 2, 3)]


def test_choose_takes_the_fastest_that_fits_and_names_the_smallest_peak_otherwise() -> None:
    preds = [Prediction(Candidate(), 30.0, 1.0), Prediction(Candidate(step_ckpt=1), 12.0, 1.5),
             Prediction(Candidate(snapshots=2), 9.0, 2.0), Prediction(Candidate(snapshots=1), 8.0, 3.0)]
    assert choose(preds, 40.0).candidate == Candidate()
    assert choose(preds, 12.0).candidate == Candidate(step_ckpt=1)
    assert choose(preds, 8.5).candidate == Candidate(snapshots=1)
    with pytest.raises(ConfigError, match=r"smallest possible is 8 MiB \(layer_ckpt=off,snapshots=1\)"):
        choose(preds, 7.9)


# -- the budget string ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("2GiB", 2 * 2 ** 30), ("512MiB", 512 * MIB), ("1.5GiB", 3 * 2 ** 29),
                                        ("64 mib", 64 * MIB), ("4096B", 4096), ("8KiB", 8192)])
def test_budget_strings_in_binary_units(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["abc", "0", "0MiB", "-1GiB", "1.5GB", "512", "nanMiB", "infGiB", "2000TiB", ""])
def test_bad_budget_strings_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--memory-budget must be a positive size with a binary unit"):
        parse_memory(text)


@pytest.mark.parametrize("args", [["--memory-budget", "abc"], ["--memory-budget", "0"], ["--memory-budget=-5MiB"],
                                  ["--set", "memory_budget=1.5GB"]])
def test_bad_budget_on_the_command_line_is_exit_2_and_writes_nothing(capsys, tmp_path, args) -> None:
    ran = cli(capsys, "run", "--variant", "lr", "--preset", "quick", "--out", str(tmp_path), *args)
    assert ran.returncode == 2 and "binary unit" in ran.stderr and len(ran.stderr.strip().splitlines()) == 1
    assert "Traceback" not in ran.stderr and not list(tmp_path.iterdir())


def test_memory_budget_in_meta_config_is_checked() -> None:
    assert MetaConfig(memory_budget=MIB).reference().memory_budget is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="memory_budget must be a number of bytes"):
            MetaConfig(memory_budget=bad)


# -- the impossible budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "bench"])
def test_a_budget_nothing_fits_is_exit_2_naming_the_smallest_peak(capsys, tmp_path, command) -> None:
    which = ["--variant", "lr"] if command == "run" else ["--variants", "lr", "--run-id", "t"]
    ran = cli(capsys, command, *which, "--preset", "quick", "--device", "cpu", "--memory-budget", "1KiB",
              "--out", str(tmp_path))
    assert ran.returncode == 2, ran.stderr
    line = ran.stderr.strip()
    assert len(line.splitlines()) == 1 and "smallest possible is" in line and "MiB" in line
    smallest = float(line.split("smallest possible is ")[1].split(" MiB")[0])
    assert smallest > 1 / 1024
    assert not list(tmp_path.iterdir())  # nothing written: no run, no results folder


# -- probe and choice on the real model ---------------------------------------------------------------------
def _budgeted(variant: str, steps: int, budget: str, preset: str = "cpu-bench", meta_batch: int = 1) -> Experiment:
    spec = RunSpec(variant=variant, preset=preset, inner_steps=steps, meta_batch=meta_batch)
    return Experiment(spec, variant=replace(get_variant(variant), memory_budget=parse_memory(budget)))


def _measured(exp: Experiment) -> float:
    step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample, check_finite=False)
    step(exp.sample())  # warm-up, as bench measures (plan_experiment's default)
    return measure_cpu_memory(step, exp.sample())["cpu_peak_alloc_mib"]


@pytest.mark.parametrize("steps, budget", [(8, "9MiB"), (32, "8MiB")])
def test_the_planned_configuration_fits_and_its_prediction_is_close(steps: int, budget: str) -> None:
    """cpu-bench, lr, meta-batch 1: predicted and measured peak within 25% (measured: equal to 4 digits)."""
    exp = _budgeted("lr", steps, budget)
    planned, plan = plan_experiment(exp)
    assert plan is not None and plan.chosen.peak_mib <= parse_memory(budget) / MIB
    measured = _measured(planned)
    print(f"K={steps} budget {budget}: {plan.text} predicted {plan.chosen.peak_mib:.4f} measured {measured:.4f}")
    assert measured <= parse_memory(budget) / MIB
    assert abs(plan.chosen.peak_mib / measured - 1) < 0.25
    assert planned.variant.learn_lr and not planned.variant.first_order  # learnable LR and order: the variant's


def test_the_choice_is_the_fastest_predicted_of_those_that_fit() -> None:
    exp = _budgeted("lr", 8, "12MiB")
    costs = {layer: probe_costs(exp.learner, exp.sample(), layer) for layer in (False, True)}
    preds = [predict(c, costs, 8) for c in candidates(8)]
    fits = [p for p in preds if p.peak_mib <= 12]
    assert fits and len(fits) < len(preds)
    chosen = choose(preds, 12)
    assert chosen.time_s == min(p.time_s for p in fits) and chosen.peak_mib <= 12


def test_vectorized_variants_plan_the_chunk() -> None:
    exp = _budgeted("vlr", 2, "1GiB", preset="quick", meta_batch=4)
    learner, plan = plan_learner(exp.learner, exp.sample(), parse_memory("1GiB"))
    assert plan.chosen.candidate.vmap_chunk >= 1 and learner.cfg.vmap_chunk == plan.chosen.candidate.vmap_chunk


def test_per_step_lrs_are_refused_not_mispredicted() -> None:
    exp = _budgeted("lr", 2, "1GiB", preset="quick")
    learner = MetaLearner(exp.learner.model, replace(exp.learner.cfg, lr_per_step=True), exp.learner.loss_fn)
    with pytest.raises(ConfigError, match="not planned for lr_per_step=True"):
        plan_learner(learner, exp.sample(), parse_memory("1GiB"))


# -- what the rows record -------------------------------------------------------------------------------------
def test_a_bench_row_records_plan_predicted_and_measured_peak_and_checks_agreement() -> None:
    row = measure_cell_inline(Cell("lr", "cpu-bench", settings={**TINY, "inner_steps": 6,
                                                                "memory_budget": parse_memory("1GiB")}), FAST)
    assert row.status == "ok", row.message
    assert row.plan and row.predicted_peak_mib > 0 and row.memory["cpu_peak_alloc_mib"] > 0
    assert row.agreement["w_rel_err"] < 1e-5  # the chosen configuration's agreement check, as today
    assert row.paired["reference"] == "lr"  # paired against its own variant unplanned, not maml


def test_a_peer_cell_with_a_budget_is_unsupported() -> None:
    row = measure_cell_inline(Cell("higher:lr", "quick", settings={"memory_budget": MIB}), FAST)
    assert row.status == "unsupported" and "memory-budget" in row.message


def test_run_prints_the_plan_in_one_line_and_records_it(capsys, tmp_path) -> None:
    ran = cli(capsys, "run", "--variant", "lr", "--preset", "quick", "--device", "cpu", "--meta-steps", "1",
              "--memory-budget", "1GiB", "--out", str(tmp_path))
    assert ran.returncode == 0, ran.stderr
    [line] = [x for x in ran.stdout.splitlines() if "plan (memory budget 1024 MiB)" in x]
    assert "predicted peak" in line and "measured" in line
    [path] = (tmp_path / "runs").iterdir()
    result = json.loads(path.read_text())
    assert result["plan"] and result["predicted_peak_mib"] == pytest.approx(
        result["memory"]["cpu_peak_alloc_mib"], rel=0.25)


@pytest.mark.parametrize("variant, settings", [("ckpt_lr", {}), ("lr", {"step_ckpt": 2}), ("bckpt_lr", {})])
def test_a_budget_on_checkpointing_already_chosen_is_refused_not_silently_replaced(variant, settings) -> None:
    row = measure_cell_inline(Cell(variant, "cpu-bench", settings={**TINY, **settings, "memory_budget": parse_memory(
        "1GiB")}), FAST)
    assert row.status == "unsupported" and "memory_budget chooses the checkpointing itself" in row.message


# -- the driver's plan is the row's; ranks; per-K settings (review of issue 22) -------------------------------
def test_the_row_records_the_plan_the_driver_printed_without_probing_again(monkeypatch, capsys) -> None:
    cell = Cell("lr", "cpu-bench", settings={**TINY, "inner_steps": 6, "memory_budget": parse_memory("1GiB")})
    [planned] = plan_cells([cell])
    printed = capsys.readouterr().out
    assert planned.memory_plan is not None and planned.key() == cell.key()  # the plan is not the cell's identity

    def no_probe(*args, **kwargs):
        raise AssertionError("the cell's process probed again")

    monkeypatch.setattr(planner, "plan_learner", no_probe)
    row = measure_cell_inline(planned, FAST)
    assert row.status == "ok", row.message
    assert f": {row.plan}, predicted peak" in printed
    assert row.predicted_peak_mib == planned.memory_plan["peak_mib"]


def test_the_cell_applies_the_given_plan_as_it_is() -> None:
    """A plan the planner would not choose at 1 GiB (binomial, 2 snapshots) is what the cell runs and records."""
    exp = _budgeted("lr", 6, "1GiB", preset="cpu-bench")
    c = Candidate(layer_ckpt=True, snapshots=2)
    given = planner.MemoryPlan(Prediction(c, 1.0, 0.0), 1024.0, 1)
    cell = Cell("lr", "cpu-bench", settings={**TINY, "inner_steps": 6, "memory_budget": parse_memory("1GiB")},
                memory_plan=given.to_json())
    row = measure_cell_inline(cell, FAST)
    assert row.status == "ok", row.message
    assert row.plan == c.text() and row.predicted_peak_mib == 1.0
    assert row.flags["snapshots"] == 2 and row.flags["layer_ckpt"] is True
    planned, _ = plan_experiment(exp, given=given)
    assert (planned.learner.cfg.snapshots, planned.learner.cfg.layer_ckpt) == (2, True)
    assert planned.variant.config(inner_steps=6).snapshots == planned.learner.cfg.snapshots


@pytest.mark.parametrize("c", [Candidate(True, step_ckpt=3), Candidate(step_ckpt=2, step_rebuild="step"),
                               Candidate(snapshots=3), Candidate()])
def test_the_planned_variant_and_the_planned_learner_agree(c: Candidate) -> None:
    exp = _budgeted("lr", 6, "1GiB", preset="quick")
    planned, _ = plan_experiment(exp, given=planner.MemoryPlan(Prediction(c, 1.0, 0.0), 1024.0, 1))
    cfg = planned.learner.cfg
    assert planned.variant.config(inner_steps=6, inner_lr=cfg.inner_lr, adapt_last=cfg.adapt_last,
                                  amp=cfg.amp, ckpt_modules=cfg.ckpt_modules) == replace(cfg, memory_budget=cfg.memory_budget)
    assert (cfg.layer_ckpt, cfg.step_ckpt, cfg.step_rebuild, cfg.snapshots) == (c.layer_ckpt, c.step_ckpt,
                                                                                c.step_rebuild, c.snapshots)


def test_a_budget_under_data_parallel_ranks_is_refused_exit_2(capsys, tmp_path) -> None:
    ran = cli(capsys, "bench", "--variants", "lr", "--preset", "quick", "--device", "cpu", "--set", "ranks=2",
              "--set", "meta_batch=2", "--memory-budget", "1GiB", "--run-id", "t", "--out", str(tmp_path))
    assert ran.returncode == 2, ran.stderr
    [line] = ran.stderr.strip().splitlines()
    assert "not planned across data-parallel ranks (ranks=2)" in line and "valid: ranks=1" in line
    assert not list(tmp_path.iterdir())
