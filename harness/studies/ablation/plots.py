"""Learning curves of an ablation: mean over seeds with a band (t 95% interval over seeds at each step).

Drawn by ``python -m harness ablate`` into ``plots/<run-id>/learning_curves.png``; checkpointed
variants (trained on the verified seeds only) are dashed over their counterparts, without a band.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from harness.reporting.files import write_figure  # noqa: E402

__all__ = ["band", "plot_curves", "smooth"]


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving mean over ``k`` points along the last axis (shorter windows at the start)."""
    c = np.cumsum(np.asarray(x, dtype=np.float64), axis=-1)
    out = c.copy()
    out[..., k:] = c[..., k:] - c[..., :-k]
    return out / np.minimum(np.arange(1, x.shape[-1] + 1), k)


def band(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (rows) and the t 95% interval over seeds at each column (the mean itself for one seed)."""
    mean = runs.mean(axis=0)
    if runs.shape[0] < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, runs.shape[0] - 1) * runs.std(axis=0, ddof=1) / np.sqrt(runs.shape[0])
    return mean, mean - half, mean + half


def _panels(summary: dict[str, Any]) -> list[tuple[str, str]]:
    panels = [("train_loss", "meta-train loss (moving mean over 10% of steps)"), ("test_loss", "meta-test loss")]
    return panels + ([("test_acc", "meta-test accuracy")] if summary["classification"] else [])


def _draw(ax: Any, c: dict[str, Any], key: str, style: dict[str, Any], with_band: bool) -> None:
    runs = [r for r in c[key] if r]
    if not runs or any(len(r) != len(runs[0]) for r in runs):
        return  # a diverged seed has a shorter curve: no mean over unequal lengths
    data = np.asarray(runs, dtype=np.float64)
    if key == "train_loss":
        data = smooth(data, max(1, data.shape[1] // 10))
        x = np.arange(1, data.shape[1] + 1)
    else:
        x = np.asarray(c["steps"][: data.shape[1]])
    mean, low, high = band(data)
    ax.plot(x, mean, **style)
    if with_band:
        ax.fill_between(x, low, high, color=style["color"], alpha=0.18, linewidth=0)


def plot_curves(summary: dict[str, Any], plots: Path) -> list[Path]:
    """One figure, a panel per curve; returns the written paths (atomic rename)."""
    panels = _panels(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette: dict[tuple, str] = {}
    for name, c in summary["curves"].items():
        f = c["flags"]
        color = palette.setdefault((f["learn_lr"], f["first_order"], f["lr_per_step"]),
                                   colors[len(palette) % len(colors)])
        ckpt = bool(f["layer_ckpt"] or f["step_ckpt"])
        style = dict(color=color, linestyle="--" if ckpt else "-", linewidth=1.2 if ckpt else 2.2, label=name)
        for ax, (key, title) in zip(axes, panels):
            _draw(ax, c, key, style, with_band=not ckpt)
            ax.set_title(title)
            ax.set_xlabel("meta-step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean over {summary['config']['seeds']} seeds, band: t 95% CI over seeds")
    axes[-1].legend(fontsize=8, title="dashed: checkpointed (verified seeds)", title_fontsize=8)
    fig.suptitle(f"{summary['run_id']}: preset {summary['config']['preset']}")
    fig.tight_layout()
    try:
        return [write_figure(Path(plots) / "learning_curves.png", fig)]
    finally:
        plt.close(fig)
