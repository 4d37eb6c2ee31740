"""``python -m harness compare BASE NEW --fail mem:5% --fail grad:1e-6``: exit 1 on a regression.

BASE and NEW are run directories or run-ids under ``results/``; compare writes nothing.  Unreadable
or malformed results are exit 2 naming the file.
"""
from __future__ import annotations

import argparse
import sys

from harness.cli.args import EXIT_FAILED, EXIT_OK, nonempty, resolve_run
from harness.reporting.compare import compare, parse_fail

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare a run against a baseline; exit 1 on regression")
    p.add_argument("base", type=nonempty, help="baseline run directory (e.g. results/baseline)")
    p.add_argument("new", type=nonempty, help="new run directory")
    p.add_argument("--fail", action="append", default=[], metavar="KIND:THRESHOLD",
                   help="mem:5%% (memory rise), grad:1e-6 (meta-gradient rel. error), time:20%% (median time rise)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    th = parse_fail(args.fail)
    regressions, warnings, lines = compare(resolve_run(args.base, file=True), resolve_run(args.new, file=True), th)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"compare {args.base} -> {args.new}")
    for line in lines:
        print(line)
    if regressions:
        print(f"REGRESSION: {len(regressions)} problem(s):")
        for r in regressions:
            print(f"  - {r}")
        return EXIT_FAILED
    print("no regression")
    return EXIT_OK
