"""Compare a run against a baseline, cell by cell: the CI regression gate.

``--fail`` expressions (repeatable):

* ``mem:5%`` -- fail when a cell's memory figure (``cpu_peak_alloc_mib``, the
  deterministic CPU figure, or on CUDA cells the allocator peak above base)
  rises by more than 5% over the baseline (``mem:0.05`` means the same);
* ``grad:1e-6`` -- fail when a cell's meta-gradient relative error (weights or
  LRs) against its non-checkpointed reference exceeds 1e-6;
* ``time:20%`` -- fail when the median meta-step time rises by more than 20%
  (off by default: wall time is not reproducible across CI machines).

A cell that was ``ok`` in the baseline and is not ``ok`` (or missing) in the
new run is a regression too, and so is a figure that a threshold checks when the
new run has it missing or NaN (no figure is no evidence of no regression).
Environments that differ (Python, torch, CUDA, GPU, CPU, threads) give a warning,
not a failure.  Each regression is a :class:`Regression` (kind, cell, baseline and
new value, threshold); a malformed results file is a :class:`ResultsError` naming
the file and line (exit 2).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from harness.core.config import ConfigError
from harness.reporting.files import by_identity, read_cells
from harness.reporting.frame import mem_figure, num, settings_str
from harness.reporting.render import fixed, fmt, percent
from harness.reporting.schema import CellRow, ResultsError

FAIL_KINDS = {"mem": "relative rise, e.g. mem:5% or mem:0.05", "grad": "absolute rel. error, e.g. grad:1e-6",
              "time": "relative rise, e.g. time:20%"}
ENV_KEYS = ("python", "torch", "cuda", "cudnn", "gpu", "driver", "cpu", "threads", "platform")
ACCEPTED = "accepted --fail expressions: " + "; ".join(f"{k}:<{v}>" for k, v in FAIL_KINDS.items())
REGRESSION_KINDS = ("missing", "status", "mem", "grad", "time", "invalid")


@dataclass(frozen=True)
class Thresholds:
    mem: float | None = None  # fraction
    grad: float | None = None
    time: float | None = None


@dataclass(frozen=True)
class Regression:
    """One failed check: ``kind`` (one of :data:`REGRESSION_KINDS`), the cell's label, the baseline's and
    the new run's value (a figure, a status, or None/NaN when missing), the threshold it broke (None for
    status and missing cells) and, for gradient checks, which part (``w`` or ``lr``)."""

    kind: str
    cell: str
    baseline: Any
    new: Any
    threshold: float | None = None
    part: str = ""
    figure: str = ""

    def __str__(self) -> str:
        return f"{self.cell}: {self.describe()}"

    def describe(self) -> str:
        b, n, th = self.baseline, self.new, self.threshold
        if self.kind == "missing":
            return "missing from the new run"
        if self.kind == "status":
            return f"status {b} -> {n}"
        if self.kind == "invalid":
            return str(n)
        if num(n) is None:
            what = {"mem": f"memory figure {self.figure}", "grad": f"{self.part} meta-gradient rel. error",
                    "time": "median time"}[self.kind]
            return f"{what} {'NaN' if isinstance(n, float) and math.isnan(n) else 'missing'} in the new run" + (
                f" (baseline {fmt(float(b))})" if num(b) is not None else "")
        if self.kind == "mem":
            return f"memory rose {percent((n - b) / b, 2, signed=True)} > {percent(th, 2)} ({self.figure} {fixed(b)} -> {fixed(n)} MiB)"
        if self.kind == "grad":
            return f"{self.part} meta-gradient rel. error {fmt(float(n), 3)} > {fmt(float(th), 6)}"
        return f"median time rose {percent((n - b) / b, signed=True)} > {percent(th)}"


class Comparison(NamedTuple):
    """What :func:`compare` found: regressions (exit 1 when any), warnings, one line per cell."""

    regressions: list[Regression]
    warnings: list[str]
    lines: list[str]


def parse_fail(exprs: list[str] | None) -> Thresholds:
    vals: dict[str, float] = {}
    for e in exprs or []:
        m = re.fullmatch(r"\s*([a-z]+)\s*:\s*([0-9.eE+-]+)\s*(%?)\s*", e)
        if not m or m.group(1) not in FAIL_KINDS:
            raise ConfigError(f"malformed --fail {e!r}; {ACCEPTED}")
        kind, text, pct = m.groups()
        try:
            v = float(text)
        except ValueError:
            raise ConfigError(f"malformed --fail {e!r}; {ACCEPTED}") from None
        if not math.isfinite(v) or v < 0 or (kind == "grad" and pct):
            raise ConfigError(f"malformed --fail {e!r}; {ACCEPTED}")
        vals[kind] = v / 100 if pct else v
    return Thresholds(**vals)


def _ident(row: CellRow) -> str:
    """A cell's full identity, as its run stored it (``Cell.key``: variant, preset, device, dtype, every setting --
    precision and ranks included --, seed, the user's model, tasks and patterns)."""
    return row.key


def _label(row: CellRow) -> str:
    s = settings_str(row.settings)
    return f"{row.variant} on {row.preset}" + (f" [{s}]" if s else "")


def env_differences(base: list[CellRow], new: list[CellRow]) -> list[str]:
    def envs(rows: list[CellRow]) -> dict[str, set]:
        out: dict[str, set] = {}
        for r in rows:
            for k in ENV_KEYS:
                out.setdefault(k, set()).add(str((r.env or {}).get(k)))
        return out

    a, b = envs(base), envs(new)
    return [f"{k}: {', '.join(sorted(a[k]))} -> {', '.join(sorted(b[k]))}" for k in ENV_KEYS if a.get(k) != b.get(k)]


def _memory(b: CellRow, n: CellRow, th: Thresholds, label: str, parts: list[str], bad: list[Regression],
            warnings: list[str]) -> None:
    (fb, mb), (fn, mn) = mem_figure(b), mem_figure(n)
    mb, mn_num = num(mb), num(mn)
    if th.mem is not None and (mb is None or mb <= 0):
        shown = mb if mb is not None else "NaN or missing"
        bad.append(Regression("invalid", label, mb, f"baseline memory figure {fb} is {shown}: nothing to compare "
                              "against (rebuild the baseline)", th.mem, figure=fb))
        return
    if mb is None:
        return
    if fb != fn and mn_num is not None:
        warnings.append(f"{label}: memory figures differ ({fb} vs {fn}); not compared")
        return
    if mn_num is None:
        parts.append(f"mem {fixed(mb)} -> {mn} MiB")
        if th.mem is not None:
            bad.append(Regression("mem", label, mb, mn, th.mem, figure=fb))
        return
    if mn_num < 0:
        bad.append(Regression("invalid", label, mb, f"memory figure {fn} {mn_num} MiB is negative", th.mem))
        return
    rise = (mn_num - mb) / mb
    parts.append(f"mem {fixed(mb)} -> {fixed(mn_num)} MiB ({percent(rise, 2, signed=True)})")
    if th.mem is not None and rise > th.mem:
        bad.append(Regression("mem", label, mb, mn_num, th.mem, figure=fn))


def _gradients(b: CellRow, n: CellRow, th: Thresholds, label: str, parts: list[str], bad: list[Regression]) -> None:
    for part in ("w", "lr"):
        eb, en = (b.agreement or {}).get(f"{part}_rel_err"), (n.agreement or {}).get(f"{part}_rel_err")
        if en is None:
            if eb is not None and th.grad is not None:
                bad.append(Regression("grad", label, eb, None, th.grad, part=part))
            continue
        parts.append(f"{part} grad err {eb if eb is None else fmt(float(eb), 3)} -> {fmt(float(en), 3)}")
        if th.grad is None:
            continue
        if math.isnan(float(en)):
            bad.append(Regression("grad", label, eb, float(en), th.grad, part=part))
        elif math.isinf(float(en)) or en < 0:  # a relative error is finite and >= 0; anything else is a bug
            bad.append(Regression("invalid", label, eb, f"{part} meta-gradient rel. error {en} is not a finite "
                                  "number >= 0", th.grad, part=part))
        elif en > th.grad:
            bad.append(Regression("grad", label, eb, en, th.grad, part=part))


def _time(b: CellRow, n: CellRow, th: Thresholds, parts: list[str], bad: list[Regression], label: str) -> None:
    tb, tn = num((b.time or {}).get("median_ms")), (n.time or {}).get("median_ms")
    if th.time is not None and (tb is None or tb <= 0):
        shown = tb if tb is not None else "NaN or missing"
        bad.append(Regression("invalid", label, tb, f"baseline median time {shown} ms: nothing to compare against "
                              "(rebuild the baseline)", th.time))
        return
    if not tb:
        return
    if num(tn) is None:
        parts.append(f"time {fixed(tb, 1)} -> {tn} ms")
        if th.time is not None:
            bad.append(Regression("time", label, tb, tn, th.time))
        return
    trise = (tn - tb) / tb
    parts.append(f"time {fixed(tb, 1)} -> {fixed(tn, 1)} ms ({percent(trise, signed=True)})")
    if th.time is not None and trise > th.time:
        bad.append(Regression("time", label, tb, tn, th.time))


def compare(base_path: Path, new_path: Path, th: Thresholds) -> Comparison:
    """Match the new run's cells to the baseline's and check each against the thresholds."""
    base, new = read_cells(base_path), read_cells(new_path)
    by_identity(base, base_path)
    new_by = by_identity(new, new_path)
    regressions: list[Regression] = []
    lines: list[str] = []
    warnings = [f"environments differ: {d}" for d in env_differences(base, new)]
    for b in base:
        n, label = new_by.get(_ident(b)), _label(b)
        if n is None:
            if b.status == "ok":
                regressions.append(Regression("missing", label, b.status, None))
            continue
        if b.status == "ok" and n.status != "ok":
            regressions.append(Regression("status", label, b.status,
                                          n.status + (f" ({n.message})" if n.message else "")))
            continue
        if n.status != "ok":
            lines.append(f"  {label}: {b.status} -> {n.status}")
            continue
        parts: list[str] = []
        bad: list[Regression] = []
        _memory(b, n, th, label, parts, bad, warnings)
        _gradients(b, n, th, label, parts, bad)
        _time(b, n, th, parts, bad, label)
        lines.append(("FAIL " if bad else "  ok ") + f"{label}: " + "; ".join(parts))
        regressions += bad
    known = {_ident(b) for b in base}
    lines += [f"  new {_label(r)}: {r.status} (not in the baseline)" for r in new if _ident(r) not in known]
    return Comparison(regressions, warnings, lines)


__all__ = ["Thresholds", "Regression", "Comparison", "REGRESSION_KINDS", "parse_fail", "compare", "env_differences",
           "ResultsError", "ACCEPTED"]
