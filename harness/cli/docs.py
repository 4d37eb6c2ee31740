"""``python -m harness docs [--check]``: rewrite the README's and docs' generated tables from the committed
results (``<!-- generated: KIND SOURCE -->`` blocks; see :mod:`harness.reporting.docblocks`).

``--check`` writes nothing and exits 1 when a block differs from what the results give.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from harness.reporting.docblocks import drifted, update


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("docs", help="rewrite the generated tables in README.md and docs/*.md from results/")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated block drifted")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root (default: the current folder)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.check:
        drifts = drifted(args.root)
        for d in drifts:
            print(f"{d.path}:{d.line}: generated block '{d.kind} {' '.join(d.args)}' differs from the results "
                  "(run `python -m harness docs`)")
        print(f"{len(drifts)} generated block(s) drifted" if drifts else "generated blocks match the results")
        return 1 if drifts else 0
    changed = update(args.root)
    print("rewrote " + ", ".join(map(str, changed)) if changed else "generated blocks already match the results")
    return 0


__all__ = ["register", "run"]
