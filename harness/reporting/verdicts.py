"""Is a variant exact on the model it ran on?  One line a user can act on, from a cell's flat row.

``python -m harness check`` (:mod:`harness.bench.check`) prints these lines; the docs' ``check`` blocks
(:mod:`harness.reporting.docblocks`) render them from committed runs.  The kinds:

* ``exact`` -- meta-gradients within :data:`AGREEMENT_TOL` of the non-checkpointed reference (weights and
  LRs), and for second order within :data:`FD_TOL` of finite differences (float64 only); with peak memory and
  time against ``maml``;
* ``refused`` -- the variant refuses the model (cell status ``unsupported``), with the reason;
* ``WRONG`` -- a figure beyond its tolerance: do not use the variant on this model;
* ``FAILED`` -- the cell errored, ran out of memory, diverged or timed out (its message).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.reporting.frame import flatten, num
from harness.reporting.render import fmt, times
from harness.reporting.schema import CellRow

__all__ = ["AGREEMENT_TOL", "FD_TOL", "PASSING", "Verdict", "verdict", "verdicts"]

AGREEMENT_TOL = {"float64": 1e-10, "float32": 1e-5}  # rel err vs the non-checkpointed reference (round-off: ~1e-16 / 1e-7)
FD_TOL = 1e-6  # rel err vs central differences, float64, h = 1e-5 (truncation and rounding ~1e-11 .. 1e-9)
PASSING = ("exact", "refused")


@dataclass(frozen=True)
class Verdict:
    """What one variant is on the user's model: ``exact``, ``refused``, ``WRONG`` or ``FAILED``, and the line."""

    variant: str
    kind: str
    line: str

    @property
    def passed(self) -> bool:
        return self.kind in PASSING


def _err(x: Any) -> str:
    return "nan" if x is not None and num(x) is None else fmt(num(x), 2)


def _exact_text(f: dict[str, Any]) -> str:
    figures = [f"weights {_err(f['w_rel_err'])}"]
    if f.get("learn_lr"):
        figures.append(f"LRs {_err(f['lr_rel_err'])}")
    if f.get("fd_rel_err") is not None:
        figures.append(f"finite differences {_err(f['fd_rel_err'])}")
    elif f.get("estimator") not in (None, "exact", "first_order"):
        fidelity = (f"{f['estimator']}: no finite differences; vs the exact meta-gradient cosine "
                    f"{_err(f.get('fidelity_w_cosine'))}, rel err {_err(f.get('fidelity_w_rel_err'))}")
        residual = f.get("fidelity_cg_residual")
        figures.append(fidelity + (f", CG residual {_err(residual)}" if residual is not None else ""))
    elif f.get("first_order"):
        figures.append("first order: no finite differences")
    else:
        figures.append("finite differences not run (float64 only)")
    return ", ".join(figures)


def _cost_text(f: dict[str, Any]) -> str:
    peak = f"peak {fmt(num(f['mem_mib']), 3)} MiB"
    if f["variant"] == "maml":
        return f"{peak}, median {fmt(num(f['time_median_ms']), 3)} ms per meta-step (the ratios' reference)"
    mem = f" = {times(num(f['mem_vs_maml']))} maml" if num(f.get("mem_vs_maml")) is not None else ""
    time = f", time {times(num(f['time_vs_maml']))} maml" if num(f.get("time_vs_maml")) is not None else ""
    paired = num(f.get("time_vs_ref_paired"))
    pair = f" (paired {times(paired)} {f['paired_ref']})" if paired is not None else ""
    return peak + mem + time + pair


def _problems(f: dict[str, Any], tol: float) -> list[str]:
    """What is beyond its tolerance (empty: exact)."""
    out = []
    for key, what in (("w_rel_err", "weights"), ("lr_rel_err", "LRs")):
        if key == "lr_rel_err" and not f.get("learn_lr"):
            continue
        x = num(f.get(key))
        if x is None or x > tol:
            out.append(f"{what} rel err {_err(f.get(key))} vs the non-checkpointed reference (tolerance {fmt(float(tol), 6)})")
    fd = f.get("fd_rel_err")
    if fd is not None and (num(fd) is None or num(fd) > FD_TOL):
        out.append(f"finite differences rel err {_err(fd)} vs the meta-gradient (tolerance {fmt(float(FD_TOL), 6)})")
    return out


def verdict(f: dict[str, Any]) -> Verdict:
    """One variant's verdict from its flat row (:func:`harness.reporting.frame.flatten`)."""
    name, status = f["variant"], f["status"]
    if status == "unsupported":
        return Verdict(name, "refused", f"refused: {f['message']}")
    if status != "ok":
        return Verdict(name, "FAILED", f"FAILED ({status}): {f['message']}")
    problems = _problems(f, AGREEMENT_TOL.get(f["dtype"], AGREEMENT_TOL["float32"]))
    if problems:
        return Verdict(name, "WRONG", f"WRONG: {'; '.join(problems)} -- do not use")
    return Verdict(name, "exact", f"exact ({_exact_text(f)}); {_cost_text(f)}")


def verdicts(rows: list[CellRow]) -> list[Verdict]:
    """:func:`verdict` of every row, in the matrix's order."""
    return [verdict(f) for f in flatten(rows)]
