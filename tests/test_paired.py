"""Claims: every cell's row carries its time relative to its reference (``cell / reference``), measured in the
cell's own process by alternating the two (A B, B A, ...) on the same batches, as the median of the per-pair
ratios with quartiles and min/max; load that changes between pairs cancels out of the ratio, and on one CPU
thread the time spent waiting for a core does not count; the reference
is the same variant without checkpointing or vectorization (peers: our same variant; else ``maml``); the
table shows the ratio beside the absolute times; the row's losses are the cell's own measured steps.

Run: ``python -m pytest tests/test_paired.py -q``
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness.bench import paired
from harness.bench.cells import Cell
from harness.bench.child import measure_cell_inline
from harness.cli.args import matrix_options
from harness.cli.main import build_parser
from harness.reporting import tables
from harness.reporting.frame import cells_frame
from harness.variants import registry
from tests.conftest import FAST, TINY


@pytest.mark.parametrize("cell,reference", [
    ("maml", None), ("fo", "maml"), ("lr", "maml"), ("ckpt_lr", "lr"), ("ckpt_sckpt_lr_fo", "lr_fo"),
    ("sckpt", "maml"), ("sckpt_lr", "lr"), ("vmaml", "maml"), ("vlr_fo", "lr_fo"),
    ("higher:maml", "maml"), ("torch_maml:sckpt", "sckpt")])
def test_reference_is_the_same_variant_without_checkpointing_or_vectorization(cell, reference):
    assert paired.reference_name(cell, registry()) == reference


def _fake_clocks(monkeypatch, waits):
    """Fake wall and CPU clocks.  A costs 3 units of CPU, B 1; each step's wall time is its cost times the
    pair's load, and the cell's steps also wait ``next(waits)`` units for a core (wall only)."""
    clock, calls, waits = {"wall": 0.0, "cpu": 0.0, "load": 1.0}, [], iter(waits)
    monkeypatch.setattr(paired.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(paired.time, "process_time", lambda: clock["cpu"])
    loads = iter([1.0, 1.0, 5.0, 1.0, 20.0, 2.0, 7.0])

    def sample():  # a new pair: the machine's load changes between pairs
        clock["load"] = next(loads)
        return []

    def step(name, cost):
        def run(tasks):
            calls.append(name)
            clock["cpu"] += cost
            clock["wall"] += cost * clock["load"] + (next(waits) if name == "A" else 0.0)
        return run
    return calls, sample, step("A", 3.0), step("B", 1.0)


def test_pairs_alternate_in_order_and_the_ratio_is_cell_over_reference_whatever_the_load(monkeypatch):
    calls, sample, cell, reference = _fake_clocks(monkeypatch, [0.0] * 6)
    monkeypatch.setattr(paired, "clock_for", lambda device: "wall")
    out = paired.paired_ratios(cell, reference, sample, pairs=4, reference="maml", warmup=1)
    assert calls == ["A", "B"] + ["A", "B", "B", "A"] * 2  # warm-up, then the order swapped every pair
    assert out["ratios"] == [3.0] * 4  # a 20x load swing between pairs leaves the ratio alone
    assert (out["median"], out["q1"], out["q3"], out["min"], out["max"]) == (3.0,) * 5
    assert out["reference"] == "maml" and out["clock"] == "wall" and out["pairs"] == 4 and "wall" not in out


def test_on_one_cpu_thread_time_spent_waiting_for_a_core_is_not_counted(monkeypatch):
    calls, sample, cell, reference = _fake_clocks(monkeypatch, [0.0, 0.0, 9.0, 0.0, 30.0])
    monkeypatch.setattr(paired, "clock_for", lambda device: "cpu")
    out = paired.paired_ratios(cell, reference, sample, pairs=4, reference="maml", warmup=1)
    assert out["clock"] == "cpu" and out["ratios"] == [3.0] * 4
    assert out["wall"]["min"] == 3.0 and out["wall"]["max"] > 3.0  # the wall clock saw the waits


def test_the_clock_is_cpu_time_only_on_the_cpu_with_one_thread():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert paired.clock_for("cpu") == "cpu" and paired.clock_for("cuda") == "wall"
        torch.set_num_threads(2)
        assert paired.clock_for("cpu") == "wall"
    finally:
        torch.set_num_threads(before)


def test_ratio_summary_median_quartiles_and_extremes():
    s = paired.ratio_summary([0.5, 0.2, 0.3, 0.4, 0.1], "lr")
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == pytest.approx((0.3, 0.2, 0.4, 0.1, 0.5))
    assert s["iqr"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        paired.paired_ratios(lambda t: 0.0, lambda t: 0.0, lambda: [], 0, "maml")


def test_a_cell_row_has_its_paired_ratio_and_the_table_shows_it():
    opts = replace(FAST, repeats=3, pairs=3)
    rows = [measure_cell_inline(Cell(v, "cpu-bench", settings=TINY), opts) for v in ("vmaml", "maml")]
    vec, ref = rows
    assert vec.status == "ok" and ref.status == "ok", (vec.message, ref.message)
    p = vec.paired
    assert p["reference"] == "maml" and p["pairs"] == 3 and len(p["ratios"]) == 3 and p["clock"] in ("cpu", "wall")
    assert p["min"] <= p["q1"] <= p["median"] <= p["q3"] <= p["max"] and p["min"] > 0
    assert ref.paired is None
    assert len(vec.losses) == opts.warmup + 1 + opts.repeats  # the paired steps are not the cell's losses
    frame = cells_frame(rows)
    assert frame["time_vs_ref_paired"].tolist() == [p["median"], None]
    md = tables.table_md(frame, "t")
    assert "time / ref (paired, IQR)" in md and f"{p['median']:.3f}x [" in md and "vs maml" in md
    assert "time_vs_ref_paired" in tables.summary_csv(frame).splitlines()[0]


def test_bench_times_cpu_cells_on_one_thread_unless_told_so_their_ratios_use_the_cpu_clock():
    parse = build_parser().parse_args
    opts = matrix_options(parse(["bench", "--device", "cpu", "--variants", "maml"]), multi_amp=True).opts
    assert opts.threads == 1 and opts.pairs is None  # None: paired.DEFAULT_PAIRS
    opts = matrix_options(parse(["bench", "--device", "cpu", "--threads", "2", "--pairs", "5"]), multi_amp=True).opts
    assert opts.threads == 2 and opts.pairs == 5


def test_no_pair_starts_that_would_end_past_the_deadline_and_the_result_says_it_was_cut(monkeypatch):
    calls, sample, cell, reference = _fake_clocks(monkeypatch, [0.0] * 6)
    monkeypatch.setattr(paired, "clock_for", lambda device: "wall")
    # warm-up ends at 4, pair 1 (load 1) at 8, pair 2 (load 5) at 28: pair 3 would end past 12
    out = paired.paired_ratios(cell, reference, sample, pairs=4, reference="maml", warmup=1, deadline=12.0)
    assert out["pairs"] == 2 and out["ratios"] == [3.0, 3.0]
    assert out["cut"] == "2 of 4 pairs: the next would end past the cell's time budget"
    assert "cut" not in paired.paired_ratios(cell, reference, sample, pairs=1, reference="maml", warmup=0)


def test_a_reference_that_fails_leaves_the_cell_ok_with_a_warning_and_a_bug_fails_the_cell(monkeypatch):
    def broken_reference(*args, **kwargs):
        raise RuntimeError("the reference ran out of memory")
    monkeypatch.setattr(paired, "Experiment", broken_reference)
    row = measure_cell_inline(Cell("fo", "cpu-bench", settings=TINY), FAST)
    assert row.status == "ok" and row.paired["error"] == "RuntimeError: the reference ran out of memory"
    assert any("no paired ratio: RuntimeError" in w for w in row.warnings)

    def bug(*args, **kwargs):
        raise TypeError("a bug")
    monkeypatch.setattr(paired, "Experiment", bug)
    row = measure_cell_inline(Cell("fo", "cpu-bench", settings=TINY), FAST)
    assert row.status == "error" and "TypeError: a bug" in row.message
