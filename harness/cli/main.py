"""``python -m harness <command>``: the dispatcher.

Bad input never shows a traceback: :class:`UsageError` (and the engine's
``ConfigError``) print one line naming the problem and the valid choices, and
exit with code 2 before anything is written.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from harness.core.config import ConfigError
from harness.variants import RegistryError

COMMANDS = ("list", "run", "diagnose", "ablate", "bench", "sweep", "report", "compare", "docs")  # modules in harness/commands/, in --help order


class UsageError(ConfigError):
    """Bad command-line input: one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    parser = Parser(prog="python -m harness", description="MAML benchmark and ablation harness")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"harness.cli.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM/SIGHUP in a matrix (bench.process.Interrupted): 128+sig
        print("interrupted", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
