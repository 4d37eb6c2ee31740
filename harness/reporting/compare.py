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
new run is a regression too.  Environments that differ (Python, torch, CUDA,
GPU, CPU, threads) give a warning, not a failure.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bench.cells import Cell, ResultsError, load_rows
from harness.core.config import ConfigError
from harness.reporting.tables import mem_figure, settings_str

FAIL_KINDS = {"mem": "relative rise, e.g. mem:5% or mem:0.05", "grad": "absolute rel. error, e.g. grad:1e-6",
              "time": "relative rise, e.g. time:20%"}
ENV_KEYS = ("python", "torch", "cuda", "cudnn", "gpu", "driver", "cpu", "threads", "platform")
ACCEPTED = "accepted --fail expressions: " + "; ".join(f"{k}:<{v}>" for k, v in FAIL_KINDS.items())


@dataclass(frozen=True)
class Thresholds:
    mem: float | None = None  # fraction
    grad: float | None = None
    time: float | None = None


def parse_fail(exprs: list[str] | None) -> Thresholds:
    vals: dict[str, float] = {}
    for e in exprs or []:
        m = re.fullmatch(r"\s*([a-z]+)\s*:\s*([0-9.eE+-]+)\s*(%?)\s*", e)
        if not m or m.group(1) not in FAIL_KINDS:
            raise ConfigError(f"malformed --fail {e!r}; {ACCEPTED}")
        kind, num, pct = m.groups()
        try:
            v = float(num)
        except ValueError:
            raise ConfigError(f"malformed --fail {e!r}; {ACCEPTED}") from None
        if v < 0 or (kind == "grad" and pct):
            raise ConfigError(f"malformed --fail {e!r}; {ACCEPTED}")
        vals[kind] = v / 100 if pct else v
    return Thresholds(**vals)


def _ident(row: dict[str, Any]) -> str:
    return Cell(row["variant"], row.get("preset", ""), row.get("device", "cpu"), row.get("dtype", "float32"),
                row.get("settings") or {}, row.get("seed", 0)).compare_key()


def _label(row: dict[str, Any]) -> str:
    s = settings_str(row.get("settings") or {})
    return f"{row['variant']} on {row.get('preset')}" + (f" [{s}]" if s else "")


def env_differences(base: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    def envs(rows: list[dict[str, Any]]) -> dict[str, set]:
        out: dict[str, set] = {}
        for r in rows:
            for k in ENV_KEYS:
                out.setdefault(k, set()).add(str((r.get("env") or {}).get(k)))
        return out

    a, b = envs(base), envs(new)
    return [f"{k}: {', '.join(sorted(a[k]))} -> {', '.join(sorted(b[k]))}" for k in ENV_KEYS if a.get(k) != b.get(k)]


def compare(base_path: Path, new_path: Path, th: Thresholds) -> tuple[list[str], list[str], list[str]]:
    """(regressions, warnings, per-cell lines)."""
    base, new = load_rows(base_path), load_rows(new_path)
    new_by = {_ident(r): r for r in new}
    regressions: list[str] = []
    lines: list[str] = []
    warnings = [f"environments differ: {d}" for d in env_differences(base, new)]
    for b in base:
        n = new_by.get(_ident(b))
        label = _label(b)
        if n is None:
            if b["status"] == "ok":
                regressions.append(f"{label}: missing from the new run")
            continue
        if b["status"] == "ok" and n["status"] != "ok":
            regressions.append(f"{label}: status ok -> {n['status']}" + (f" ({n.get('message')})" if n.get("message") else ""))
            continue
        if n["status"] != "ok":
            lines.append(f"  {label}: {b['status']} -> {n['status']}")
            continue
        parts, bad = [], []
        fb, mb = mem_figure(b)
        fn, mn = mem_figure(n)
        if mb is not None and mn is not None and fb == fn:
            rise = (mn - mb) / mb if mb else (0.0 if mn == mb else float("inf"))
            parts.append(f"mem {mb:.4f} -> {mn:.4f} MiB ({rise:+.2%})")
            if th.mem is not None and rise > th.mem:
                bad.append(f"memory rose {rise:+.2%} > {th.mem:.2%} ({fn} {mb:.4f} -> {mn:.4f} MiB)")
        elif mb is not None and fb != fn:
            warnings.append(f"{label}: memory figures differ ({fb} vs {fn}); not compared")
        for part in ("w", "lr"):
            eb, en = (b.get("agreement") or {}).get(f"{part}_rel_err"), (n.get("agreement") or {}).get(f"{part}_rel_err")
            if en is None:
                if eb is not None and th.grad is not None:
                    bad.append(f"{part} meta-gradient rel. error missing (baseline {float(eb):.3g})")
                continue
            en = float(en)
            parts.append(f"{part} grad err {eb if eb is None else f'{float(eb):.3g}'} -> {en:.3g}")
            if th.grad is not None and not (en <= th.grad):
                bad.append(f"{part} meta-gradient rel. error {en:.3g} > {th.grad:g}")
        tb, tn = (b.get("time") or {}).get("median_ms"), (n.get("time") or {}).get("median_ms")
        if tb and tn is not None:
            trise = (tn - tb) / tb
            parts.append(f"time {tb:.1f} -> {tn:.1f} ms ({trise:+.1%})")
            if th.time is not None and trise > th.time:
                bad.append(f"median time rose {trise:+.1%} > {th.time:.1%}")
        lines.append(("FAIL " if bad else "  ok ") + f"{label}: " + "; ".join(parts))
        regressions += [f"{label}: {x}" for x in bad]
    extra = [r for r in new if _ident(r) not in {_ident(b) for b in base}]
    for r in extra:
        lines.append(f"  new {_label(r)}: {r['status']} (not in the baseline)")
    return regressions, warnings, lines


__all__ = ["Thresholds", "parse_fail", "compare", "ResultsError", "ACCEPTED"]
