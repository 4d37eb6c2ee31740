"""The PNG plots of a run, ``plots/<run-id>/*.png`` (``DIR/plots/<run-id>/`` for ``--out DIR``), from the flat cells of :mod:`harness.reporting.frame`.

Peak memory per variant, time per variant, memory against time (Pareto view) and the gradient error;
``peers.png`` (ours and the peers per computation), ``precision.png`` (memory and time per
precision) and ``fidelity.png`` (an estimator's error against the exact meta-gradient, against memory and time:
the fidelity frontier, docs/estimators.md) when the run has them; for sweeps, memory and time against the swept parameter.
``python -m harness report RUN`` draws them (``--no-plots`` skips them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after selecting the file-only backend
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from harness.reporting.files import write_figure  # noqa: E402
from harness.reporting.frame import AMP_ORDER, computation_key, line_labels  # noqa: E402
from harness.reporting.render import fmt, times  # noqa: E402

PEER_COLORS = {None: "tab:blue", "higher": "tab:orange", "torchopt": "tab:green"}
ERROR_FLOOR = 1e-18  # exact agreement (0) drawn at this height on the log axis
LOG_SPAN = 100  # a sweep whose values span this factor or more is drawn on log-log axes (inner_steps 8..1024)
TIME_LABEL = "meta-step time, median (ms)"
Save = Callable[[Any, str], None]


def make_plots(flat: list[dict[str, Any]], settings: list[dict[str, Any]], sweep: str | None, out: Path,
               title: str) -> list[Path]:
    """Draw every plot the run has data for into ``out``; returns the files written.

    ``settings`` are the cells' raw settings (in ``flat``'s order), for the swept parameter's values."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        try:
            written.append(write_figure(out / name, fig))  # atomic: a link planted at the name is replaced
        finally:
            plt.close(fig)

    ok = [f for f in flat if f["status"] == "ok"]
    if not ok:
        return written
    fig_name = ok[0]["mem_figure"]
    if any(f.get("fidelity_w_rel_err") is not None for f in ok):
        fidelity_plot(flat, settings, title, save, fig_name)
    if sweep:
        sweep_plots(flat, settings, sweep, title, save, fig_name)
        return written
    variant_plots(ok, title, save, fig_name)
    if any(f["peer"] for f in flat):
        peers_plot(flat, title, save, fig_name)
    if any(f["amp"] != "off" for f in flat):
        precision_plot(flat, title, save, fig_name)
    return written


def _bars(ok: list[dict[str, Any]]) -> tuple[Any, Any, list[str]]:
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(ok)), 4))
    many = len({g["settings"] for g in ok}) > 1
    return fig, ax, [f["variant"] + (f"\n{f['settings']}" if many else "") for f in ok]


def variant_plots(ok: list[dict[str, Any]], title: str, save: Save, fig_name: str) -> None:
    """memory.png, time.png, pareto.png and grad_error.png: one bar or point per ``ok`` cell."""
    xs = list(range(len(ok)))
    fig, ax, labels = _bars(ok)
    ax.bar(xs, [f["mem_mib"] or 0 for f in ok], color="tab:blue")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"peak memory (MiB, {fig_name})")
    ax.set_title(f"{title}: peak memory per variant")
    save(fig, "memory.png")

    fig, ax, labels = _bars(ok)
    ax.bar(xs, [f["time_median_ms"] or 0 for f in ok], yerr=[(f["time_iqr_ms"] or 0) / 2 for f in ok],
           color="tab:orange", capsize=3)
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"{TIME_LABEL}, bar: IQR")
    ax.set_title(f"{title}: time per variant")
    save(fig, "time.png")

    pareto_plot(ok, title, save, fig_name)

    fig, ax, labels = _bars(ok)
    ax.bar([x - 0.2 for x in xs], [max(f["w_rel_err"] or 0, ERROR_FLOOR) for f in ok], width=0.4, label="weights")
    ax.bar([x + 0.2 for x in xs], [max(f["lr_rel_err"] or 0, ERROR_FLOOR) for f in ok], width=0.4, label="LRs")
    ax.set_yscale("log")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"meta-gradient rel. error vs reference (floor {fmt(float(ERROR_FLOOR), 6)})")
    ax.set_title(f"{title}: gradient error")
    ax.legend()
    save(fig, "grad_error.png")


def pareto_plot(ok: list[dict[str, Any]], title: str, save: Save, fig_name: str) -> None:
    """pareto.png: memory against time, with the front of cells no other cell beats on both."""
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
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel(f"peak memory (MiB, {fig_name})")
    ax.set_title(f"{title}: memory vs time")
    save(fig, "pareto.png")


def sweep_plots(flat: list[dict[str, Any]], settings: list[dict[str, Any]], sweep: str, title: str, save: Save,
                fig_name: str) -> None:
    """sweep_memory.png and sweep_time.png: one line per variant (and per other setting that differs between its
    cells, :func:`line_labels`) against the swept parameter; log-log axes when the values span LOG_SPAN or more."""
    by_variant: dict[str, list[tuple[float, dict]]] = {}
    labels = line_labels([f["variant"] for f in flat], settings, sweep)
    for s, f, label in zip(settings, flat, labels):
        if f["status"] == "ok":
            by_variant.setdefault(label, []).append((float((s or {}).get(sweep, 0)), f))
    xs = [x for pts in by_variant.values() for x, _ in pts if x > 0]
    log = bool(xs) and max(xs) >= LOG_SPAN * min(xs)
    for metric, ylabel, name in (("mem_mib", f"peak memory (MiB, {fig_name})", "sweep_memory.png"),
                                 ("time_median_ms", TIME_LABEL, "sweep_time.png")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for v, pts in by_variant.items():
            pts.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1][metric] for p in pts], marker="o", label=v)
        if log:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set_xlabel(sweep)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {ylabel.split(' (')[0]} vs {sweep}")
        ax.legend(fontsize=8)
        save(fig, name)


def _peer_groups(flat: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for f in flat:
        if f.get("first_order") is not None:
            groups.setdefault(computation_key(f), []).append(f)
    return {k: v for k, v in groups.items() if any(f["peer"] for f in v) and any(f["peer"] is None for f in v)}


def _peer_bar(axes: Any, x: float, f: dict[str, Any]) -> None:
    for ax, col in zip(axes, ("mem_mib", "time_median_ms")):
        if f["status"] == "ok" and f.get(col) is not None:
            ax.bar(x, f[col], color=PEER_COLORS.get(f["peer"], "tab:gray"), width=0.8)
            if col == "mem_mib" and f["peer"] is None and f.get("mem_vs_best_peer") is not None:
                ax.annotate(times(f['mem_vs_best_peer']), (x, f[col]), ha="center", va="bottom", fontsize=6)
        else:
            ax.scatter([x], [0], marker="x", color="tab:red")


def peers_plot(flat: list[dict[str, Any]], title: str, save: Save, fig_name: str) -> None:
    """``peers.png``: per computation (order x inner LR [x settings]), our cells and the peers' side by side,
    memory (top) and time (bottom); unsupported peer cells are marked with an x at 0."""
    groups = _peer_groups(flat)
    if not groups:
        return
    short = _varying_settings([k[3] for k in groups])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * sum(len(v) for v in groups.values()) + 3), 8))
    x, ticks, labels = 0.0, [], []
    for k, fs in groups.items():
        fs = sorted(fs, key=lambda f: (f["peer"] is not None, f["peer"] or ""))  # stable: ours in matrix order
        for f in fs:
            _peer_bar(axes, x, f)
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
    axes[1].set_ylabel(TIME_LABEL)
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


def precision_plot(flat: list[dict[str, Any]], title: str, save: Save, fig_name: str) -> None:
    """``precision.png``: memory (top) and time (bottom) per variant, one bar per precision; labels on the
    non-fp32 bars give the ratio against fp32."""
    ok = [f for f in flat if f["status"] == "ok"]
    amps = [a for a in AMP_ORDER if any(f["amp"] == a for f in ok)] + sorted({f["amp"] for f in ok} - set(AMP_ORDER))
    keys = list(dict.fromkeys((f["variant"], f["settings_noamp"]) for f in ok))
    multi = len({k[1] for k in keys}) > 1
    w = 0.8 / max(1, len(amps))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(keys) + 2), 8))
    for ax, col, ratio in zip(axes, ("mem_mib", "time_median_ms"), ("mem_vs_fp32", "time_vs_fp32")):
        for j, a in enumerate(amps):
            cell = {(f["variant"], f["settings_noamp"]): f for f in ok if f["amp"] == a}
            xs = [i + (j - (len(amps) - 1) / 2) * w for i in range(len(keys))]
            ax.bar(xs, [(cell[k].get(col) or 0) if k in cell else 0 for k in keys], width=w,
                   label="fp32 (off)" if a == "off" else a)
            for xx, k in zip(xs, keys):
                if a != "off" and k in cell and cell[k].get(ratio) is not None:
                    ax.annotate(times(cell[k][ratio]), (xx, cell[k].get(col) or 0), ha="center", va="bottom",
                                fontsize=6)
        ax.set_xticks(range(len(keys)), [k[0] + (f"\n{k[1]}" if multi else "") for k in keys], rotation=60,
                      ha="right", fontsize=8)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"peak memory (MiB, {fig_name})")
    axes[1].set_ylabel(TIME_LABEL)
    axes[0].set_title(f"{title}: memory and time per precision (label: ratio vs fp32)")
    save(fig, "precision.png")


def fidelity_plot(flat: list[dict[str, Any]], settings: list[dict[str, Any]], title: str, save: Save,
                  fig_name: str) -> None:
    """fidelity.png: each estimator's relative error against the exact meta-gradient (log; the exact cells at the
    floor) against peak memory and against time, one line per variant through its inner-step counts."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    lines: dict[str, list[tuple[Any, float, float, float]]] = {}
    for f, raw in zip(flat, settings):
        if f["status"] != "ok" or f["mem_mib"] is None or f["time_median_ms"] is None:
            continue
        err = f.get("fidelity_w_rel_err")
        err = ERROR_FLOOR if err is None or err < ERROR_FLOOR else err  # no fidelity: the exact estimator itself
        lines.setdefault(f["variant"], []).append((raw.get("inner_steps", ""), err, f["mem_mib"], f["time_median_ms"]))
    for name, pts in lines.items():
        for ax, i in ((axes[0], 2), (axes[1], 3)):
            pts.sort(key=lambda p, i=i: p[i])  # each panel's line in the order of its own axis
            ax.plot([p[i] for p in pts], [p[1] for p in pts], marker="o", label=name)
            for p in pts:
                ax.annotate(f"K={p[0]}", (p[i], p[1]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax, xlabel in ((axes[0], f"peak memory (MiB, {fig_name})"), (axes[1], TIME_LABEL)):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.tick_params(axis="x", which="minor", labelbottom=False)  # decades only: the minor labels overlap
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(f"rel. error vs the exact meta-gradient (exact at {fmt(ERROR_FLOOR)})")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: fidelity frontier")
    save(fig, "fidelity.png")


__all__ = ["PEER_COLORS", "make_plots", "fidelity_plot", "variant_plots", "pareto_plot", "sweep_plots",
           "peers_plot", "precision_plot"]
