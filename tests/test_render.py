"""The one number formatter (``harness.reporting.render``) on exact small values, and the rule that keeps it
the only one: the modules that write tables and reports format no number themselves.

    python -m pytest tests/test_render.py
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.reporting.render import (MISSING, fixed, fmt, fmt_ratio, markdown_rows, markdown_table, paired_text,
                                      percent, times)

HARNESS = Path(__file__).resolve().parent.parent / "harness"
# the modules whose output is a table, a report or a generated block (commands' one-line messages are not)
TABLE_WRITERS = ["reporting/tables.py", "reporting/docblocks.py", "reporting/verdicts.py", "reporting/plots.py",
                 "studies/ablation/tables.py", "studies/ablation/plots.py", "reporting/compare.py"]
FORMAT_SPEC = re.compile(r"\{[^{}]*:[+ ]?\.?\d*[fgeG%]\}")  # {x:.3f}, {x:+.1%}, {x:g}, ... inside an f-string


@pytest.mark.parametrize("value, digits, text", [
    (None, 4, ""), (0.0, 4, "0"), (3, 4, "3"), (True, 4, "True"), (1234.5678, 4, "1235"), (0.000123456, 3, "0.000123"),
    (1.5e-12, 2, "1.5e-12"), (math.nan, 4, "nan"), (math.inf, 4, "inf"), ("ok", 4, "ok")])
def test_fmt_gives_significant_digits(value, digits, text):
    assert fmt(value, digits) == text


@pytest.mark.parametrize("call, text", [
    (lambda: fixed(0.65489067), "0.6549"), (lambda: fixed(2.25, 1), "2.2"), (lambda: fixed(-0.5, 2, signed=True), "-0.50"),
    (lambda: fixed(0.5, 2, signed=True), "+0.50"), (lambda: fixed(None), ""), (lambda: fixed(12.7, 0), "13"),
    (lambda: percent(0.0314), "3.1%"), (lambda: percent(-0.02, signed=True), "-2.0%"), (lambda: percent(0.02, 2, signed=True), "+2.00%"),
    (lambda: times(1.1749), "1.17x"), (lambda: times(0.4061, 3), "0.406x"), (lambda: times(None), ""),
    (lambda: fmt_ratio(0.4061), "0.406x"), (lambda: fmt_ratio(None), MISSING), (lambda: fmt_ratio(math.inf), MISSING),
    (lambda: fmt_ratio(True), MISSING)])
def test_fixed_percent_and_multiples_on_exact_values(call, text):
    assert call() == text


def test_paired_text_shows_median_quartiles_and_reference():
    p = {"median": 0.4412, "q1": 0.4301, "q3": 0.4604, "reference": "maml"}
    assert paired_text(p) == "0.441x [0.430-0.460] vs maml"
    assert paired_text(p, reference=False) == "0.441x [0.430-0.460]"
    assert paired_text({"median": None, "error": "no pairs"}) == f"{MISSING} (no pairs)"
    assert paired_text(None) == MISSING


def test_markdown_table_escapes_bars_and_keeps_the_compact_form():
    frame = pd.DataFrame([["a|b", None]], columns=["x", "y"])
    assert markdown_table(frame) == ["| x | y |", "|---|---|", "| a\\|b |  |"]
    assert markdown_rows(["k"], [[1]]) == ["| k |", "|---|", "| 1 |"]


@pytest.mark.parametrize("module", TABLE_WRITERS)
def test_table_writers_format_numbers_only_through_render(module):
    text = (HARNESS / module).read_text()
    specs = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
             if FORMAT_SPEC.search(line) and "Error(" not in line]
    assert not specs, f"{module} formats numbers itself (use harness.reporting.render): {specs[:3]}"
