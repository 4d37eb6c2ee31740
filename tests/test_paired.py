"""Claims: every cell's row carries its time relative to its reference (``cell / reference``), measured in the
cell's own process by alternating the two (A B A B ...) on the same batches, as the median of the per-pair
ratios with quartiles and min/max; load that changes between pairs cancels out of the ratio; the reference
is the same variant without checkpointing or vectorization (peers: our same variant; else ``maml``); the
table shows the ratio beside the absolute times; the row's losses are the cell's own measured steps.

Run: ``python -m pytest tests/test_paired.py -q``
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from harness.bench import paired
from harness.bench.cells import Cell
from harness.bench.child import measure_cell_inline
from harness.reporting import tables
from harness.variants import registry
from tests.conftest import FAST, TINY


@pytest.mark.parametrize("cell,reference", [
    ("maml", None), ("fo", "maml"), ("lr", "maml"), ("ckpt_lr", "lr"), ("ckpt_sckpt_lr_fo", "lr_fo"),
    ("sckpt", "maml"), ("sckpt_lr", "lr"), ("vmaml", "maml"), ("vlr_fo", "lr_fo"),
    ("higher:maml", "maml"), ("torch_maml:sckpt", "sckpt")])
def test_reference_is_the_same_variant_without_checkpointing_or_vectorization(cell, reference):
    assert paired.reference_name(cell, registry()) == reference


def _fake_steps(loads):
    """Steps that advance a fake clock: A costs 3 units, B 1, both times a load that changes between pairs."""
    clock, calls, loads = {"now": 0.0, "load": 1.0}, [], iter(loads)

    def step(name, cost):
        def run(tasks):
            if name == "A":
                clock["load"] = next(loads)
            calls.append(name)
            clock["now"] += cost * clock["load"]
        return run
    return clock, calls, step("A", 3.0), step("B", 1.0)


def test_pairs_alternate_and_the_ratio_is_cell_over_reference_whatever_the_load(monkeypatch):
    clock, calls, cell, reference = _fake_steps([1.0, 1.0, 5.0, 1.0, 20.0])  # first: the warm-up pair
    monkeypatch.setattr(paired.time, "perf_counter", lambda: clock["now"])
    out = paired.paired_ratios(cell, reference, lambda: [], pairs=4, reference="maml", warmup=1)
    assert calls == ["A", "B"] * 5
    assert out["ratios"] == [3.0] * 4  # a 20x load swing between pairs leaves the ratio alone
    assert (out["median"], out["q1"], out["q3"], out["min"], out["max"]) == (3.0,) * 5
    assert out["reference"] == "maml" and out["order"] == "ABAB" and out["pairs"] == 4


def test_ratio_summary_median_quartiles_and_extremes():
    s = paired.ratio_summary([0.5, 0.2, 0.3, 0.4, 0.1], "lr")
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == pytest.approx((0.3, 0.2, 0.4, 0.1, 0.5))
    assert s["iqr"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        paired.paired_ratios(lambda t: 0.0, lambda t: 0.0, lambda: [], 0, "maml")


def test_a_cell_row_has_its_paired_ratio_and_the_table_shows_it():
    opts = replace(FAST, repeats=3)
    rows = [measure_cell_inline(Cell(v, "cpu-bench", settings=TINY), opts) for v in ("vmaml", "maml")]
    vec, ref = rows
    assert vec["status"] == "ok" and ref["status"] == "ok", (vec.get("message"), ref.get("message"))
    p = vec["paired"]
    assert p["reference"] == "maml" and p["pairs"] == 3 and len(p["ratios"]) == 3
    assert p["min"] <= p["q1"] <= p["median"] <= p["q3"] <= p["max"] and p["min"] > 0
    assert ref["paired"] is None
    assert len(vec["losses"]) == opts.warmup + 1 + opts.repeats  # the paired steps are not the cell's losses
    flat = tables.flatten(rows)
    assert flat[0]["time_vs_ref_paired"] == p["median"] and flat[1]["time_vs_ref_paired"] is None
    md = tables.table_md(flat, "t")
    assert "time / ref (paired, IQR)" in md and f"{p['median']:.3f}x [" in md and "vs maml" in md
    assert "time_vs_ref_paired" in tables.summary_csv(flat).splitlines()[0]
