"""Cell rows -> one flat pandas DataFrame with the ratios the tables and plots show.

The one conversion: :func:`cells_frame` takes the typed rows (:class:`CellRow`, as
:func:`harness.reporting.files.read_cells` or the matrix return them) and builds the frame once; the tables
format it and the plots and Markdown sections iterate over its records (:func:`flatten`), never turning records
back into a frame.  One line per cell: identity, status, the memory figure, time statistics, gradient agreement, and the
ratios computed as joins on the same run's rows -- against ``maml`` in the same (preset, device, dtype,
settings) group, against the best peer of the same computation (:func:`best_peer_frame`), against the same
variant's fp32 (``amp=off``) cell.  A ratio needs both figures finite and the denominator nonzero;
otherwise it is missing (None), never a made-up number.

The memory figure is ``cuda_peak_alloc_above_base_mib`` on CUDA cells and ``cpu_peak_alloc_mib``
(deterministic live bytes) on CPU cells.  Used by ``python -m harness report RUN``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from harness.core.config import ConfigError
from harness.reporting.render import paired_text
from harness.reporting.schema import CellRow
from harness.variants import RegistryError, get_variant

AMP_ORDER = ("off", "bf16", "fp16")  # precisions in table and plot order
FP32_KEYS = ("fp32_w_rel_err", "fp32_w_cosine", "fp32_lr_rel_err", "fp32_lr_cosine")
MEMORY_KEYS = ("cpu_peak_alloc_mib", "cuda_peak_alloc_mib", "cuda_peak_alloc_above_base_mib",
               "cuda_peak_reserved_mib", "nvml_peak_mib")
AGREEMENT_KEYS = ("w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine")
FIDELITY_KEYS = (*AGREEMENT_KEYS, "cg_residual")  # CellRow.fidelity: an approximate estimator vs the exact one
GROUP = ["preset", "device", "dtype", "settings", "user"]  # cells compared with each other (user: --model/--tasks/--ckpt)
COMPUTATION = [*GROUP, "computes_first_order", "computes_learn_lr"]  # what a peer must compute to compare
PRECISION_GROUP = ["variant", "preset", "device", "dtype", "settings_noamp", "user"]
PAIRED_COLUMNS = ["paired_ref", "time_vs_ref_paired", "time_vs_ref_paired_q1", "time_vs_ref_paired_q3",
                  "time_vs_ref_paired_min", "time_vs_ref_paired_max", "time_vs_ref_pairs", "time_vs_ref_paired_text"]


def paired_columns(paired: dict[str, Any] | None) -> dict[str, Any]:
    """A row's paired ratio (``harness.bench.paired``) as table columns (``None`` where it has none)."""
    p = paired or {}
    return {"paired_ref": p.get("reference"), "time_vs_ref_paired": num(p.get("median")),
            "time_vs_ref_paired_q1": num(p.get("q1")), "time_vs_ref_paired_q3": num(p.get("q3")),
            "time_vs_ref_paired_min": num(p.get("min")), "time_vs_ref_paired_max": num(p.get("max")),
            "time_vs_ref_pairs": p.get("pairs"), "time_vs_ref_paired_text": paired_text(p)}


def settings_str(settings: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((settings or {}).items()))


def setting_text(key: str, value: Any) -> str:
    """``key=value`` as a label shows it (a memory budget in MiB, as it was given)."""
    return f"{key}={value / 2 ** 20:g}MiB" if key == "memory_budget" and num(value) is not None else f"{key}={value}"


def line_labels(variants: list[str], settings: list[dict[str, Any]], swept: str) -> list[str]:
    """Each cell's line in a sweep: its variant, with the settings (but ``swept``) whose value differs between
    the same variant's cells (``sckpt_lr step_ckpt=sqrt,step_rebuild=step``), and any memory budget
    (``lr memory_budget=12MiB``: the planner's cells are never the variant's own)."""
    rest = [{k: v for k, v in (s or {}).items() if k != swept} for s in settings]
    values: dict[tuple[str, str], set[str]] = {}
    for v, r in zip(variants, rest):
        for k in {k for x, w in zip(rest, variants) if w == v for k in x}:
            values.setdefault((v, k), set()).add(repr(r.get(k)))
    out = []
    for v, r in zip(variants, rest):
        shown = [setting_text(k, r[k]) for k in sorted(r) if len(values[v, k]) > 1 or k == "memory_budget"]
        out.append(f"{v} {','.join(shown)}" if shown else v)
    return out


def user_str(row: CellRow) -> str:
    """The user's ``--model``/``--tasks``/``--ckpt`` of a row as one text (``""``: the preset's model and tasks)."""
    parts = [("model", row.model), ("tasks", row.tasks), ("ckpt", ",".join(row.ckpt or []))]
    return "; ".join(f"{k} {v}" for k, v in parts if v)


def mem_figure(row: CellRow) -> tuple[str, float | None]:
    """(name, value) of the cell's memory figure: the CUDA allocator peak above base on CUDA, else the CPU one."""
    m = row.memory or {}
    if row.device == "cuda" and m.get("cuda_peak_alloc_above_base_mib") is not None:
        return "cuda_peak_alloc_above_base_mib", m["cuda_peak_alloc_above_base_mib"]
    return "cpu_peak_alloc_mib", m.get("cpu_peak_alloc_mib")


def num(x: Any) -> float | None:
    """A finite number, or None (missing, NaN, inf, or not a number)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _flags(row: CellRow) -> dict[str, Any]:
    """The row's variant flags; rows without them (old files, early failures) look the variant up."""
    if row.flags:
        return row.flags
    try:
        return get_variant(row.base_variant or row.variant.split(":", 1)[-1]).flags
    except (ConfigError, RegistryError):  # an unknown variant or a broken registry: no flags, no peer matching
        return {}


def _record(r: CellRow) -> dict[str, Any]:
    m, t, a = r.memory or {}, r.time or {}, r.agreement or {}
    fig, mem = mem_figure(r)
    settings = dict(r.settings or {})
    amp = str(settings.pop("amp", None) or r.amp or "off")
    flags = _flags(r)
    return {
        "peer": r.peer or (r.variant.split(":", 1)[0] if ":" in r.variant else None),
        "base_variant": r.base_variant or r.variant.split(":", 1)[-1], "amp": amp,
        "first_order": flags.get("first_order"), "learn_lr": flags.get("learn_lr"),
        "estimator": flags.get("estimator") or ("first_order" if flags.get("first_order") else "exact"),
        **{f"fidelity_{k}": (r.fidelity or {}).get(k) for k in FIDELITY_KEYS},  # vs the exact meta-gradient
        "settings_noamp": settings_str(settings), **{k: a.get(k) for k in FP32_KEYS},
        "variant": r.variant, "preset": r.preset, "device": r.device, "dtype": r.dtype,
        "settings": settings_str(r.settings), "user": user_str(r), "model": r.model, "tasks": r.tasks,
        "ckpt": ",".join(r.ckpt) if r.ckpt else None, "fd_rel_err": r.fd_rel_err,
        "status": r.status, "mem_mib": mem, "mem_figure": fig,
        "time_median_ms": t.get("median_ms"), "time_iqr_ms": t.get("iqr_ms"), "time_min_ms": t.get("min_ms"),
        "time_count": t.get("count"), **{k: m.get(k) for k in MEMORY_KEYS},
        **{k: a.get(k) for k in AGREEMENT_KEYS},
        "final_query_loss": r.final_query_loss, "message": r.message or "",
        **paired_columns(r.paired),  # time / reference from alternating pairs
        "plan": r.plan, "predicted_peak_mib": r.predicted_peak_mib,  # --memory-budget
    }


def _divide(a: Iterable[Any], b: Iterable[Any], ok: Iterable[bool] | None = None) -> list[float | None]:
    a, b = list(a), list(b)
    ok = list(ok) if ok is not None else [True] * len(a)
    return [x / y if good and num(x) is not None and num(y) else None for x, y, good in zip(a, b, ok)]


def _lookup(frame: pd.DataFrame, refs: pd.DataFrame, on: list[str], cols: list[str]) -> pd.DataFrame:
    """For every line of ``frame``, the columns ``cols`` of the reference line with the same ``on`` values
    (the last one when several; missing: None), in ``frame``'s order."""
    ref = refs.drop_duplicates(on, keep="last")[on + cols].rename(columns={c: f"ref_{c}" for c in cols})
    out = frame[on].merge(ref, on=on, how="left", sort=False)
    return out.astype(object).where(out.notna(), None)


def cells_frame(rows: Iterable[CellRow]) -> pd.DataFrame:
    """The flat DataFrame of a run's rows (object columns: ints stay ints, missing is None)."""
    df = pd.DataFrame([_record(r) for r in rows], dtype=object)
    if df.empty:
        return df
    df["computes_first_order"] = df["first_order"].map(bool)
    df["computes_learn_lr"] = df["learn_lr"].map(bool)
    ok = (df["status"] == "ok").tolist()
    maml = _lookup(df, df[(df["variant"] == "maml") & (df["status"] == "ok")], GROUP, ["mem_mib", "time_median_ms"])
    df["mem_vs_maml"] = _divide(df["mem_mib"], maml["ref_mem_mib"])
    df["time_vs_maml"] = _divide(df["time_median_ms"], maml["ref_time_median_ms"])
    best = _lookup(df, best_peer_frame(df), COMPUTATION, ["variant", "mem_mib", "time_median_ms"])
    ours = [good and p is None for good, p in zip(ok, df["peer"])]
    df["best_peer"] = [v if o else None for v, o in zip(best["ref_variant"], ours)]
    df["mem_vs_best_peer"] = _divide(df["mem_mib"], best["ref_mem_mib"], ours)
    df["time_vs_best_peer"] = _divide(df["time_median_ms"], best["ref_time_median_ms"], ours)
    fp32 = _lookup(df, df[(df["amp"] == "off") & (df["status"] == "ok")], PRECISION_GROUP,
                   ["mem_mib", "time_median_ms"])
    df["mem_vs_fp32"] = _divide(df["mem_mib"], fp32["ref_mem_mib"], ok)
    df["time_vs_fp32"] = _divide(df["time_median_ms"], fp32["ref_time_median_ms"], ok)
    return df.astype(object).where(df.notna(), None)


def best_peer_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per computation, the ``ok`` peer cell with the lowest peak memory (ties: the lower median time,
    then the first in the run)."""
    mem = df["mem_mib"].map(num)
    cand = df[df["peer"].notna() & (df["status"] == "ok") & mem.notna() & df["first_order"].notna()].copy()
    cand["_mem"] = cand["mem_mib"].map(num)
    cand["_time"] = cand["time_median_ms"].map(lambda t: num(t) if num(t) is not None else math.inf)
    return cand.sort_values(["_mem", "_time"], kind="mergesort").drop_duplicates(COMPUTATION, keep="first")


def flatten(rows: Iterable[CellRow]) -> list[dict[str, Any]]:
    """:func:`cells_frame` as one dict per cell (what the Markdown sections and plots iterate over)."""
    return cells_frame(rows).to_dict("records")


def computation_key(f: dict[str, Any]) -> tuple:
    """What a peer must compute to be compared: preset, device, dtype, settings (precision included),
    order and inner-LR setting.  Checkpointing is not part of it."""
    return (f["preset"], f["device"], f["dtype"], f["settings"], f.get("user") or "", bool(f.get("first_order")),
            bool(f.get("learn_lr")))


__all__ = ["AMP_ORDER", "FIDELITY_KEYS", "FP32_KEYS", "GROUP", "COMPUTATION", "PAIRED_COLUMNS", "paired_columns",
           "settings_str", "setting_text", "line_labels",
           "user_str", "mem_figure", "num", "cells_frame", "best_peer_frame", "flatten", "computation_key"]
