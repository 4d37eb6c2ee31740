"""Tables and plots from ``results/<run-id>/cells.jsonl``.

* ``summary.csv`` -- one line per cell: status, memory figures, time statistics,
  gradient agreement, final query loss, and ratios against ``maml`` in the same
  (preset, device, dtype, settings) group.
* ``table.md`` -- the same matrix as a Markdown table; with peer cells
  (``higher:<v>``, ``torchopt:<v>``) a side-by-side section with each of our
  variants against the best peer (:func:`best_peers`); with more than one
  precision (``settings.amp``) a precision section with ratios against fp32.
* ``plots/<run-id>/*.png`` -- peak memory per variant, time per variant, memory
  against time (Pareto view), gradient error; ``peers.png`` (ours and the peers
  per computation) and ``precision.png`` (memory and time per precision) when
  the run has them; for sweeps, memory and time against the swept parameter.

The memory figure used for ratios and plots is ``cuda_peak_alloc_above_base_mib``
on CUDA cells and ``cpu_peak_alloc_mib`` (deterministic live bytes) on CPU cells.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from harness.bench.cells import load_rows
from harness.bench.paired import PAIRED_COLUMNS, paired_columns
from harness.reporting.schema import write_text_atomic

COLUMNS = ["variant", "preset", "device", "dtype", "settings", "status", "mem_mib", "mem_figure", "mem_vs_maml",
           "time_median_ms", "time_iqr_ms", "time_min_ms", "time_count", "time_vs_maml",
           "cpu_peak_alloc_mib", "cuda_peak_alloc_mib", "cuda_peak_alloc_above_base_mib", "cuda_peak_reserved_mib",
           "nvml_peak_mib", "w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine", "final_query_loss", "message",
           "peer", "base_variant", "amp", "first_order", "learn_lr", "best_peer", "mem_vs_best_peer",
           "time_vs_best_peer", "mem_vs_fp32", "time_vs_fp32", "fp32_w_rel_err", "fp32_w_cosine", "fp32_lr_rel_err",
           "fp32_lr_cosine", *PAIRED_COLUMNS]
AMP_ORDER = ("off", "bf16", "fp16")
FP32_KEYS = ("fp32_w_rel_err", "fp32_w_cosine", "fp32_lr_rel_err", "fp32_lr_cosine")
BEST_PEER_LEGEND = (
    "**Best peer**: among the `ok` peer cells (`higher:*`, `torchopt:*`) that compute the same meta-gradient as "
    "our variant -- same order (`first_order`) and same inner-LR setting (`learn_lr`; checkpointing is not part "
    "of the computation, so `ckpt_lr` is matched with `higher:lr`/`torchopt:lr`), same preset, settings and "
    "precision -- the one with the lowest peak memory (ties: lower median time). `mem / best peer` and "
    "`time / best peer` are our peak memory and median time divided by that one cell's; below 1 means ours "
    "uses less. Unsupported peer cells are listed with their reason.")


def settings_str(settings: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((settings or {}).items()))


def mem_figure(row: dict[str, Any]) -> tuple[str, float | None]:
    m = row.get("memory") or {}
    if row.get("device") == "cuda" and m.get("cuda_peak_alloc_above_base_mib") is not None:
        return "cuda_peak_alloc_above_base_mib", m["cuda_peak_alloc_above_base_mib"]
    return "cpu_peak_alloc_mib", m.get("cpu_peak_alloc_mib")


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _flags(row: dict[str, Any]) -> dict[str, Any]:
    """The row's variant flags; rows without them (old files, early failures) look the variant up."""
    if row.get("flags"):
        return row["flags"]
    name = row.get("base_variant") or str(row.get("variant", "")).split(":", 1)[-1]
    try:
        from harness.variants import get_variant

        return get_variant(name).flags
    except Exception:  # noqa: BLE001 -- an unknown variant: no flags, no peer matching
        return {}


def _peer_of(row: dict[str, Any]) -> str | None:
    v = str(row.get("variant", ""))
    return row.get("peer") or (v.split(":", 1)[0] if ":" in v else None)


def flatten(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        m, t, a = r.get("memory") or {}, r.get("time") or {}, r.get("agreement") or {}
        fig, mem = mem_figure(r)
        settings = dict(r.get("settings") or {})
        amp = str(settings.pop("amp", None) or r.get("amp") or "off")
        flags = _flags(r)
        peer = _peer_of(r)
        out.append({
            "peer": peer, "base_variant": r.get("base_variant") or str(r["variant"]).split(":", 1)[-1], "amp": amp,
            "first_order": flags.get("first_order"), "learn_lr": flags.get("learn_lr"),
            "settings_noamp": settings_str(settings),
            **{k: a.get(k) for k in FP32_KEYS},
            "variant": r["variant"], "preset": r.get("preset"), "device": r.get("device"), "dtype": r.get("dtype"),
            "settings": settings_str(r.get("settings")), "status": r["status"], "mem_mib": mem, "mem_figure": fig,
            "time_median_ms": t.get("median_ms"), "time_iqr_ms": t.get("iqr_ms"), "time_min_ms": t.get("min_ms"),
            "time_count": t.get("count"),
            **{k: m.get(k) for k in ("cpu_peak_alloc_mib", "cuda_peak_alloc_mib", "cuda_peak_alloc_above_base_mib",
                                     "cuda_peak_reserved_mib", "nvml_peak_mib")},
            **{k: a.get(k) for k in ("w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine")},
            "final_query_loss": r.get("final_query_loss"), "message": r.get("message") or "",
            **paired_columns(r),  # time / reference from alternating pairs (harness.bench.paired)
        })
    groups: dict[tuple, dict[str, Any]] = {}
    for f in out:
        if f["variant"] == "maml" and f["status"] == "ok":
            groups[(f["preset"], f["device"], f["dtype"], f["settings"])] = f
    for f in out:
        ref = groups.get((f["preset"], f["device"], f["dtype"], f["settings"]))
        for col, src in (("mem_vs_maml", "mem_mib"), ("time_vs_maml", "time_median_ms")):
            a, b = _num(f.get(src)), _num(ref.get(src)) if ref else None
            f[col] = a / b if (a is not None and b) else None
    best = best_peers(out)
    for f in out:
        bp = best.get(computation_key(f)) if f["peer"] is None and f["status"] == "ok" else None
        f["best_peer"] = bp["variant"] if bp else None
        f["mem_vs_best_peer"] = _ratio(f, bp, "mem_mib")
        f["time_vs_best_peer"] = _ratio(f, bp, "time_median_ms")
    fp32 = {(f["variant"], f["preset"], f["device"], f["dtype"], f["settings_noamp"]): f for f in out
            if f["amp"] == "off" and f["status"] == "ok"}
    for f in out:
        ref = fp32.get((f["variant"], f["preset"], f["device"], f["dtype"], f["settings_noamp"]))
        f["mem_vs_fp32"] = _ratio(f, ref, "mem_mib")
        f["time_vs_fp32"] = _ratio(f, ref, "time_median_ms")
    return out


def _ratio(f: dict[str, Any], ref: dict[str, Any] | None, col: str) -> float | None:
    if ref is None or f["status"] != "ok":
        return None
    a, b = _num(f.get(col)), _num(ref.get(col))
    return a / b if (a is not None and b) else None


def computation_key(f: dict[str, Any]) -> tuple:
    """What a peer must compute to be compared: preset, device, dtype, settings (precision included),
    order and inner-LR setting.  Checkpointing is not part of it."""
    return (f["preset"], f["device"], f["dtype"], f["settings"], bool(f.get("first_order")), bool(f.get("learn_lr")))


def best_peers(flat: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """computation_key -> the ``ok`` peer cell with the lowest peak memory (ties: lower median time)."""
    best: dict[tuple, dict[str, Any]] = {}
    for f in flat:
        if f["peer"] is None or f["status"] != "ok" or _num(f.get("mem_mib")) is None or f.get("first_order") is None:
            continue
        k = computation_key(f)
        rank = (f["mem_mib"], _num(f.get("time_median_ms")) or float("inf"))
        cur = best.get(k)
        if cur is None or rank < (cur["mem_mib"], _num(cur.get("time_median_ms")) or float("inf")):
            best[k] = f
    return best


def _order(f: dict[str, Any]) -> str:
    return "first" if f.get("first_order") else "second"


def _lr(f: dict[str, Any]) -> str:
    return "learned" if f.get("learn_lr") else "fixed"


def _cell_fig(f: dict[str, Any] | None, col: str) -> str:
    if f is None:
        return "—"
    if f["status"] != "ok":
        return f["status"]
    return _fmt(f.get(col))


def _x(v: float | None) -> str:
    return f"{v:.3f}x" if v is not None else "—"


def peers_md(flat: list[dict[str, Any]]) -> list[str]:
    """The side-by-side section: each of our variants, the peer cells of the same computation, the ratios
    against the best peer, and per group our best second-order variant against the best second-order peer."""
    peer_rows = [f for f in flat if f["peer"]]
    if not peer_rows:
        return []
    peers = list(dict.fromkeys(f["peer"] for f in peer_rows))
    ours = [f for f in flat if f["peer"] is None]
    multi = len({f["settings"] for f in flat}) > 1
    head = ["our variant", *(["settings"] if multi else []), "order", "inner LR", "ours MiB", "ours ms"]
    for p in peers:
        head += [f"{p} MiB", f"{p} ms"]
    head += ["best peer", "mem / best peer", "time / best peer"]
    lines = ["## Ours and the peers side by side", "", BEST_PEER_LEGEND, "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for f in peer_rows:
        if f.get("first_order") is not None:
            by_key.setdefault(computation_key(f), {}).setdefault(f["peer"], f)
    for f in ours:
        row = [f"`{f['variant']}`", *([f["settings"]] if multi else []), _order(f), _lr(f),
               _cell_fig(f, "mem_mib"), _cell_fig(f, "time_median_ms")]
        match = by_key.get(computation_key(f), {})
        for p in peers:
            pf = match.get(p)
            row += [(_cell_fig(pf, "mem_mib") + (f" (`{pf['variant']}`)" if pf and pf["status"] == "ok" else ""))
                    if pf else "—", _cell_fig(pf, "time_median_ms") if pf and pf["status"] == "ok" else "—"]
        row += [f"`{f['best_peer']}`" if f["best_peer"] else "none supported", _x(f["mem_vs_best_peer"]),
                _x(f["time_vs_best_peer"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += [""]
    for line in second_order_headlines(flat):
        lines.append(f"- {line}")
    return lines + [""]


def second_order_headlines(flat: list[dict[str, Any]]) -> list[str]:
    """Per (preset, device, dtype, settings): our lowest-memory second-order cell vs the lowest-memory
    second-order peer cell (any inner-LR setting), memory ratio (and the time ratio of the same two cells)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in flat:
        if f["status"] == "ok" and f.get("first_order") is False and _num(f.get("mem_mib")) is not None:
            groups.setdefault((f["preset"], f["device"], f["dtype"], f["settings"]), []).append(f)
    out = []
    multi = len(groups) > 1
    for (preset, device, dtype, settings), fs in groups.items():
        where = f" [{preset}, {device}" + (f", {settings}" if settings and multi else "") + "]"
        ours = [f for f in fs if f["peer"] is None]
        theirs = [f for f in fs if f["peer"] is not None]
        if not ours or not theirs:
            continue
        a = min(ours, key=lambda f: f["mem_mib"])
        b = min(theirs, key=lambda f: (f["mem_mib"], _num(f.get("time_median_ms")) or float("inf")))
        t = _ratio(a, b, "time_median_ms")
        out.append(f"**Our best second-order variant vs the best second-order peer**{where}: `{a['variant']}` "
                   f"{_fmt(a['mem_mib'])} MiB vs `{b['variant']}` {_fmt(b['mem_mib'])} MiB = "
                   f"**{a['mem_mib'] / b['mem_mib']:.3f}x** memory"
                   + (f" (time {t:.3f}x, {_fmt(a['time_median_ms'])} vs {_fmt(b['time_median_ms'])} ms)"
                      if t is not None else ""))
    return out


def precision_md(flat: list[dict[str, Any]]) -> list[str]:
    """Memory and time per variant per precision, ratios against the same cell at fp32 (``off``), and the
    meta-gradient against the fp32 non-checkpointed reference."""
    amps = {f["amp"] for f in flat}
    if amps <= {"off"}:
        return []
    order = {a: i for i, a in enumerate(AMP_ORDER)}
    variants = list(dict.fromkeys(f["variant"] for f in flat))
    rows = sorted(flat, key=lambda f: (variants.index(f["variant"]), f["settings_noamp"], order.get(f["amp"], 9)))
    multi = len({f["settings_noamp"] for f in flat}) > 1
    head = ["variant", *(["settings"] if multi else []), "precision", "status", "peak mem MiB", "mem / fp32",
            "median ms", "time / fp32", "w rel err vs fp32 ref", "w cosine", "lr rel err vs fp32 ref", "lr cosine"]
    lines = ["## Precision", "",
             "Each cell at each precision (`off` = fp32; `bf16`/`fp16` = fp32 weights under autocast). "
             "`mem / fp32` and `time / fp32` divide by the same variant's `off` cell (below 1: a saving). "
             "The error and cosine columns compare the cell's meta-gradients with the fp32 non-checkpointed "
             "reference on the same weights and tasks (`off` rows: the cell's own agreement with it).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for f in rows:
        off = f["amp"] == "off"
        err = [f.get(k[5:] if off else k) for k in FP32_KEYS]
        lines.append("| " + " | ".join([
            f"`{f['variant']}`", *([f["settings_noamp"]] if multi else []), f["amp"], f["status"],
            _fmt(f["mem_mib"]), _x(f["mem_vs_fp32"]), _fmt(f["time_median_ms"]), _x(f["time_vs_fp32"]),
            *(_fmt(e, 7 if "cosine" in k else 3) for k, e in zip(FP32_KEYS, err))]) + " |")
    return lines + [""]


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.{digits}g}"
    return str(x)


def summary_csv(flat: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for f in flat:
        w.writerow({k: ("" if f.get(k) is None else f.get(k)) for k in COLUMNS})
    return buf.getvalue()


def table_md(flat: list[dict[str, Any]], title: str) -> str:
    cols = [("variant", "variant"), ("settings", "settings"), ("status", "status"), ("mem_mib", "peak mem MiB"),
            ("mem_vs_maml", "mem / maml"), ("time_median_ms", "median ms"), ("time_iqr_ms", "IQR ms"),
            ("time_vs_maml", "time / maml"), ("time_vs_ref_paired_text", "time / ref (paired, IQR)"),
            ("w_rel_err", "w rel err"), ("lr_rel_err", "lr rel err"),
            ("final_query_loss", "final query loss")]
    figs = sorted({f["mem_figure"] for f in flat})
    presets = sorted({f"{f['preset']} ({f['device']}, {f['dtype']})" for f in flat})
    lines = [f"# {title}", "", f"Preset: {'; '.join(presets)}. Memory figure: {', '.join(figs)}. "
             "Ratios are against `maml` in the same preset/settings."
             + (" On the CPU the memory figure is deterministic (live tensor bytes); the times depend on the "
                "machine's load (noisy on a shared machine) and are no guide to GPU speed."
                if any(f["device"] == "cpu" for f in flat) else ""), "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for f in flat:
        cells = []
        for k, _ in cols:
            v = f.get(k)
            cells.append(f"{v:.3f}x" if k.endswith("vs_maml") and v is not None else _fmt(v, 3 if "err" in k else 4))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{f['variant']}` [{f['settings']}]: {f['status']}: {f['message']}" for f in flat if f["message"]]
    if notes:
        lines += ["", "Notes:", *notes]
    extra = peers_md(flat) + precision_md(flat)
    if extra:
        lines += ["", *extra]
    return "\n".join(lines).rstrip("\n") + "\n"


def plots_dir_for(run_dir: Path) -> Path:
    """``results/<run-id>`` -> ``plots/<run-id>`` (a ``plots`` folder beside the results root)."""
    run_dir = Path(run_dir)
    return run_dir.parent.parent / "plots" / run_dir.name


def make_plots(rows: list[dict[str, Any]], flat: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = [f for f in flat if f["status"] == "ok"]
    sweep = next((r.get("sweep_param") for r in rows if r.get("sweep_param")), None)
    labels = [f"{f['variant']}" + (f"\n{f['settings']}" if len({g['settings'] for g in ok}) > 1 else "") for f in ok]
    fig_name = ok[0]["mem_figure"] if ok else "memory"

    def save(fig: Any, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    if ok and not sweep:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        ax.bar(range(len(ok)), [f["mem_mib"] or 0 for f in ok], color="tab:blue")
        ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"peak memory (MiB, {fig_name})")
        ax.set_title(f"{title}: peak memory per variant")
        save(fig, "memory.png")

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        ax.bar(range(len(ok)), [f["time_median_ms"] or 0 for f in ok],
               yerr=[(f["time_iqr_ms"] or 0) / 2 for f in ok], color="tab:orange", capsize=3)
        ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("meta-step time, median (ms), bar: IQR")
        ax.set_title(f"{title}: time per variant")
        save(fig, "time.png")

        fig, ax = plt.subplots(figsize=(7, 5))
        pts = [(f["time_median_ms"], f["mem_mib"], f["variant"]) for f in ok
               if f["time_median_ms"] is not None and f["mem_mib"] is not None]
        for t, m, name in pts:
            ax.scatter(t, m, color="tab:blue")
            ax.annotate(name, (t, m), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("inf")
        for t, m, _ in sorted(pts):
            if m < best:
                front.append((t, m))
                best = m
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", alpha=0.6,
                    label="Pareto front")
            ax.legend()
        ax.set_xlabel("meta-step time, median (ms)")
        ax.set_ylabel(f"peak memory (MiB, {fig_name})")
        ax.set_title(f"{title}: memory vs time")
        save(fig, "pareto.png")

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
        floor = 1e-18
        xs = range(len(ok))
        ax.bar([x - 0.2 for x in xs], [max(f["w_rel_err"] or 0, floor) for f in ok], width=0.4, label="weights")
        ax.bar([x + 0.2 for x in xs], [max(f["lr_rel_err"] or 0, floor) if f["lr_rel_err"] is not None else floor
                                       for f in ok], width=0.4, label="LRs")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"meta-gradient rel. error vs reference (floor {floor:g})")
        ax.set_title(f"{title}: gradient error")
        ax.legend()
        save(fig, "grad_error.png")

    if ok and not sweep and any(f["peer"] for f in flat):
        save_peers_plot(flat, title, save, fig_name, plt)
    if ok and not sweep and any(f["amp"] != "off" for f in flat):
        save_precision_plot(flat, title, save, fig_name, plt)

    if ok and sweep:
        by_variant: dict[str, list[tuple[float, dict]]] = {}
        for r, f in zip(rows, flat):
            if f["status"] == "ok":
                by_variant.setdefault(r["variant"], []).append((float((r.get("settings") or {}).get(sweep, 0)), f))
        for metric, ylabel, name in (("mem_mib", f"peak memory (MiB, {fig_name})", "sweep_memory.png"),
                                     ("time_median_ms", "meta-step time, median (ms)", "sweep_time.png")):
            fig, ax = plt.subplots(figsize=(7, 5))
            for v, pts in by_variant.items():
                pts.sort(key=lambda p: p[0])
                ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], marker="o", label=v)
            ax.set_xlabel(sweep)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {ylabel.split(' (')[0]} vs {sweep}")
            ax.legend(fontsize=8)
            save(fig, name)
    return written


PEER_COLORS = {None: "tab:blue", "higher": "tab:orange", "torchopt": "tab:green"}


def save_peers_plot(flat: list[dict[str, Any]], title: str, save: Any, fig_name: str, plt: Any) -> None:
    """``peers.png``: per computation (order x inner LR [x settings]), our cells and the peers' side by side,
    memory (top) and time (bottom); unsupported peer cells are marked with an x at 0."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in flat:
        if f.get("first_order") is not None:
            groups.setdefault(computation_key(f), []).append(f)
    groups = {k: v for k, v in groups.items() if any(f["peer"] for f in v) and any(f["peer"] is None for f in v)}
    if not groups:
        return
    from matplotlib.transforms import blended_transform_factory

    short = _varying_settings([k[3] for k in groups])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * sum(len(v) for v in groups.values()) + 3), 8))
    x, ticks, labels = 0.0, [], []
    for k, fs in groups.items():
        fs = sorted(fs, key=lambda f: (f["peer"] is not None, f["peer"] or ""))  # stable: ours in matrix order
        for f in fs:
            for ax, col in zip(axes, ("mem_mib", "time_median_ms")):
                if f["status"] == "ok" and f.get(col) is not None:
                    ax.bar(x, f[col], color=PEER_COLORS.get(f["peer"], "tab:gray"), width=0.8)
                    if col == "mem_mib" and f["peer"] is None and f.get("mem_vs_best_peer") is not None:
                        ax.annotate(f"{f['mem_vs_best_peer']:.2f}x", (x, f[col]), ha="center", va="bottom",
                                    fontsize=6)
                else:
                    ax.scatter([x], [0], marker="x", color="tab:red")
            ticks.append(x)
            labels.append(f["variant"] + ("" if f["status"] == "ok" else f" ({f['status']})"))
            x += 1
        for ax in axes:
            ax.axvline(x - 0.5 + 0.25, color="0.8", lw=0.8)
        axes[0].text(x - len(fs) / 2 - 0.5, 0.98, f"{'FO' if k[4] else '2nd order'}, {'learned' if k[5] else 'fixed'}"
                     f" LR" + (f"\n{short[k[3]]}" if short[k[3]] else ""), ha="center", va="top", fontsize=7,
                     color="0.3", transform=blended_transform_factory(axes[0].transData, axes[0].transAxes))
        x += 0.5
    for ax in axes:
        ax.set_xticks(ticks, labels, rotation=70, ha="right", fontsize=7)
    axes[0].set_ylabel(f"peak memory (MiB, {fig_name})")
    axes[1].set_ylabel("meta-step time, median (ms)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PEER_COLORS.values()]
    axes[0].legend(handles, ["ours", "higher", "torchopt"], fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.15)
    axes[0].set_title(f"{title}: ours vs peers per computation (label: mem / best peer; x: unsupported)")
    save(fig, "peers.png")


def _varying_settings(settings: list[str]) -> dict[str, str]:
    """Each settings string reduced to the items that differ between them (for short plot labels)."""
    items = {s: set(filter(None, s.split(","))) for s in settings}
    common = set.intersection(*items.values()) if items else set()
    return {s: ",".join(sorted(i - common)) for s, i in items.items()}


def save_precision_plot(flat: list[dict[str, Any]], title: str, save: Any, fig_name: str, plt: Any) -> None:
    """``precision.png``: memory (top) and time (bottom) per variant, one bar per precision; labels on the
    non-fp32 bars give the ratio against fp32."""
    ok = [f for f in flat if f["status"] == "ok"]
    amps = [a for a in AMP_ORDER if any(f["amp"] == a for f in ok)] + sorted(
        {f["amp"] for f in ok} - set(AMP_ORDER))
    keys = list(dict.fromkeys((f["variant"], f["settings_noamp"]) for f in ok))
    multi = len({k[1] for k in keys}) > 1
    w = 0.8 / max(1, len(amps))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(keys) + 2), 8))
    for ax, col, ratio in zip(axes, ("mem_mib", "time_median_ms"), ("mem_vs_fp32", "time_vs_fp32")):
        for j, a in enumerate(amps):
            cell = {(f["variant"], f["settings_noamp"]): f for f in ok if f["amp"] == a}
            xs = [i + (j - (len(amps) - 1) / 2) * w for i in range(len(keys))]
            ys = [(cell[k].get(col) or 0) if k in cell else 0 for k in keys]
            ax.bar(xs, ys, width=w, label="fp32 (off)" if a == "off" else a)
            if a != "off":
                for xx, k in zip(xs, keys):
                    if k in cell and cell[k].get(ratio) is not None:
                        ax.annotate(f"{cell[k][ratio]:.2f}x", (xx, cell[k].get(col) or 0), ha="center",
                                    va="bottom", fontsize=6)
        ax.set_xticks(range(len(keys)), [k[0] + (f"\n{k[1]}" if multi else "") for k in keys], rotation=60,
                      ha="right", fontsize=8)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"peak memory (MiB, {fig_name})")
    axes[1].set_ylabel("meta-step time, median (ms)")
    axes[0].set_title(f"{title}: memory and time per precision (label: ratio vs fp32)")
    save(fig, "precision.png")


def build(run_dir: Path, *, plots: bool = True, plots_dir: Path | None = None) -> dict[str, Any]:
    """(Re)build summary.csv, table.md and the plots of a run directory."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    flat = flatten(rows)
    title = run_dir.name
    csv_path = write_text_atomic(run_dir / "summary.csv", summary_csv(flat))
    md_path = write_text_atomic(run_dir / "table.md", table_md(flat, title))
    pngs = make_plots(rows, flat, plots_dir or plots_dir_for(run_dir), title) if plots else []
    return {"rows": rows, "flat": flat, "summary": csv_path, "table": md_path, "plots": pngs}


def to_json(flat: list[dict[str, Any]]) -> str:
    return json.dumps(flat, indent=1)
