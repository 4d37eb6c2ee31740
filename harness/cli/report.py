"""``python -m harness report RUN``: rebuild summary.csv, table.md and the plots of a run.

``RUN`` is a run directory or a run-id under ``--out`` (default ``results/``); the plots go where ``bench``
writes them: for a run-id, ``plots/<run-id>/`` without ``--out`` and ``DIR/plots/<run-id>/`` with ``--out DIR``;
for a run directory, ``plots/<run-id>/`` when it is in the default ``results/``, ``DIR/plots/<run-id>/`` when
it is in any other folder ``DIR``.  Both folders are tried before anything is
written, so a bad plots folder is exit 2 with the tables untouched.
"""
from __future__ import annotations

import argparse

from harness.cli.args import add_out_argument, check_out_dir, names_a_path, nonempty, plots_root, resolve_run
from harness.reporting.paths import plots_dir_for
from harness.reporting.tables import build

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild tables and plots of a results run")
    p.add_argument("run", type=nonempty, help="a run directory (results/<run-id>) or a run-id under --out")
    add_out_argument(p)
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    run_dir = check_out_dir(resolve_run(args.run, args.out), flag="RUN")
    plots = plots_dir_for(run_dir) if names_a_path(args.run) else plots_root(args.out) / run_dir.name
    if not args.no_plots:
        check_out_dir(plots, flag="plots folder")
    out = build(run_dir, plots=not args.no_plots, plots_dir=plots)
    print(out["table"].read_text(), end="")
    print(f"wrote {out['summary']}, {out['table']}"
          + (f", {len(out['plots'])} plots in {out['plots'][0].parent}" if out["plots"] else ""))
    return 0
