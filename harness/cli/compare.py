"""``python -m harness compare BASE NEW --fail mem:5% --fail grad:1e-6``: exit 1 on a regression."""
from __future__ import annotations

import argparse
import sys

from harness.cli.report import resolve_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare a run against a baseline; exit 1 on regression")
    p.add_argument("base", help="baseline run directory (e.g. results/baseline)")
    p.add_argument("new", help="new run directory")
    p.add_argument("--fail", action="append", default=[], metavar="KIND:THRESHOLD",
                   help="mem:5%% (memory rise), grad:1e-6 (meta-gradient rel. error), time:20%% (median time rise)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from harness.reporting.compare import compare, parse_fail

    th = parse_fail(args.fail)
    regressions, warnings, lines = compare(resolve_run(args.base), resolve_run(args.new), th)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"compare {args.base} -> {args.new}")
    for line in lines:
        print(line)
    if regressions:
        print(f"REGRESSION: {len(regressions)} problem(s):")
        for r in regressions:
            print(f"  - {r}")
        return 1
    print("no regression")
    return 0
