"""``python -m harness report RUN``: rebuild summary.csv, table.md and the plots of a run."""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.cli.bench import DEFAULT_RESULTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild tables and plots of a results run")
    p.add_argument("run", help="a run directory (results/<run-id>) or a run-id under results/")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(handler=run)


def resolve_run(text: str) -> Path:
    p = Path(text)
    if p.is_dir() or p.suffix == ".jsonl" or len(p.parts) > 1:
        return p.parent if p.suffix == ".jsonl" else p
    return DEFAULT_RESULTS / text


def run(args: argparse.Namespace) -> int:
    from harness.reporting import tables as report

    out = report.build(resolve_run(args.run), plots=not args.no_plots)
    print(out["table"].read_text(), end="")
    print(f"wrote {out['summary']}, {out['table']}"
          + (f", {len(out['plots'])} plots in {out['plots'][0].parent}" if out["plots"] else ""))
    return 0
