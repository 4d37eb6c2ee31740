"""Numbers and tables as text: the one number formatter and the one Markdown table writer.

Every table the harness prints or writes (``table.md``, the ablation's tables, the generated blocks in the
README and docs) formats its figures here, so one figure reads the same everywhere: :func:`fmt`
(significant digits), :func:`fixed` (decimal places), :func:`percent`, :func:`times` and :func:`fmt_ratio`
(multiples), :func:`paired_text` (a paired ratio with its quartiles).
An absent figure is an empty cell (``fmt``, ``fixed``, ``percent``, ``times`` give "" for None); an absent
ratio is ``—`` (:func:`fmt_ratio`, :func:`paired_text`): a ratio column always has a reference, so a missing
one is worth a mark the reader sees.  Both forms are in committed tables; changing either rewrites them.
Markdown comes from a DataFrame through :func:`markdown_table` (a dozen lines here rather than
``DataFrame.to_markdown``, which needs ``tabulate`` and pads every column to its widest cell: the committed
tables keep the compact ``| a | b |`` form and no dependency is added).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

MISSING = "—"


def fmt(x: Any, digits: int = 4) -> str:
    """A figure as text: ``digits`` significant digits for floats, ``nan``/``inf`` as such, "" for None."""
    if x is None:
        return ""
    if isinstance(x, bool) or not isinstance(x, float):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return "0" if x == 0 else f"{x:.{digits}g}"


def fixed(x: Any, decimals: int = 4, *, signed: bool = False) -> str:
    """A figure with ``decimals`` places (``+``/``-`` always shown when ``signed``); "" for None."""
    if x is None:
        return ""
    return f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"


def percent(x: Any, decimals: int = 1, *, signed: bool = False) -> str:
    """A fraction as a percentage (``0.031`` -> ``3.1%``, or ``+3.1%`` when ``signed``); "" for None."""
    if x is None:
        return ""
    return f"{x:+.{decimals}%}" if signed else f"{x:.{decimals}%}"


def times(x: Any, decimals: int = 2) -> str:
    """A multiple as ``1.17x``; "" for None."""
    return "" if x is None else f"{fixed(x, decimals)}x"


def fmt_ratio(x: Any, missing: str = MISSING) -> str:
    """A ratio as ``0.406x`` (three decimals); ``missing`` when there is none."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return missing
    return times(x, 3)


def paired_text(p: dict[str, Any] | None, *, reference: bool = True) -> str:
    """A paired ratio as ``0.441x [0.430-0.460] vs maml`` (median [quartiles], ``harness.bench.paired``);
    ``—`` (with the reason when the row has one) when there is no finite median."""
    p = p or {}
    med = p.get("median")
    if not isinstance(med, (int, float)) or isinstance(med, bool) or not math.isfinite(med):
        return f"{MISSING} ({p['error']})" if p.get("error") else MISSING
    text = f"{times(med, 3)} [{fixed(p['q1'], 3)}-{fixed(p['q3'], 3)}]"
    return f"{text} vs {p['reference']}" if reference else text


def markdown_table(frame: pd.DataFrame) -> list[str]:
    """The frame as Markdown lines: header, separator, one line per row (cells already text; a ``|`` inside a
    cell is escaped)."""
    def cell(v: Any) -> str:
        return "" if v is None else str(v).replace("|", "\\|")

    head = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False, name=None)]
    return lines


def markdown_rows(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """:func:`markdown_table` of rows given as lists of cells."""
    return markdown_table(pd.DataFrame([list(r) for r in rows], columns=list(head)))


__all__ = ["MISSING", "fixed", "fmt", "fmt_ratio", "markdown_rows", "markdown_table", "paired_text", "percent", "times"]
