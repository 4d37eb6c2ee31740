"""Where a command's results and plots go: the repository's ``results/`` + ``plots/`` pair by default, and
everything under ``DIR`` with an explicit ``--out DIR``.  Apart from :mod:`harness.reporting.plots` so that
a command's checks (``harness.cli.args``) do not load matplotlib.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_PLOTS_ROOT", "DEFAULT_RESULTS_ROOT", "plots_dir_for", "plots_root", "results_root"]

DEFAULT_RESULTS_ROOT = Path("results")  # the commands' results root without --out (relative to the current directory)
DEFAULT_PLOTS_ROOT = Path("plots")  # ... and its plots, beside it: the repository's results/ + plots/ pair


def results_root(out: Path | None) -> Path:
    """The results root of a command: ``--out DIR`` as given (``out``), or the default ``results/`` (``None``)."""
    return DEFAULT_RESULTS_ROOT if out is None else Path(out)


def plots_root(out: Path | None) -> Path:
    """Where a command's plots go, from whether ``--out`` was given (the parser's ``None`` when it was not):
    without it ``plots/``, beside the default ``results/`` (the repository's pair); with ``--out DIR``,
    ``DIR/plots/``, so that a run's results and figures stay in the folder named."""
    return DEFAULT_PLOTS_ROOT if out is None else Path(out) / "plots"


def plots_dir_for(run_dir: Path) -> Path:
    """The plots of a run folder named by its path (``report RUN``): ``results/<run-id>`` -> ``plots/<run-id>``
    when its folder is the default results root, ``DIR/<run-id>`` -> ``DIR/plots/<run-id>`` otherwise."""
    run_dir = Path(run_dir)
    default = run_dir.parent.absolute() == DEFAULT_RESULTS_ROOT.absolute()
    return plots_root(None if default else run_dir.parent) / run_dir.name
