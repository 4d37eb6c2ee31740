"""``python -m harness <command>``: the dispatcher, and the one place that turns errors into exit codes.

Bad input never shows a traceback: :class:`UsageError` (and the engine's ``ConfigError``) print one
line naming the problem and the valid choices and exit 2 before anything is written; Ctrl-C exits
130 (SIGTERM 143, SIGHUP 129 while a matrix, an ablation or a scaling run runs).  Every command runs inside one
temp folder of its own, removed at the end (:mod:`harness.bench.run_temp`).  A command's own result is 0 (all cells ok or unsupported) or 1 (a regression, or a cell that
failed, diverged or timed out).  The codes: :mod:`harness.cli.args`; the list: README, "Bad input
and exit codes".
"""
from __future__ import annotations

import argparse
import importlib
import sys

from harness.bench.deathsig import LINUX, arm_parent_death_signal
from harness.bench.run_temp import run_temp_folder
from harness.cli.args import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError
from harness.core.config import ConfigError
from harness.loop import distributed
from harness.settings import check_environment
from harness.variants import RegistryError

__all__ = ["COMMANDS", "Parser", "UsageError", "build_parser", "main"]

COMMANDS = ("list", "run", "check", "diagnose", "ablate", "bench", "sweep", "scaling", "report", "compare",
            "docs")  # harness/cli/<c>.py, --help order


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def build_parser(argv: list[str] | None = None) -> Parser:
    """The parser for ``argv``: only the named command's module is imported (lazy registration).

    ``harness list`` or ``harness run --variant nosuch`` so never load the modules of the other commands
    (the tables' pandas, the plots' matplotlib); ``python -m harness --help`` registers every command, for
    the full help, and so does ``argv=None`` (the full parser, for tests).
    """
    parser = Parser(prog="python -m harness", description="MAML benchmark and ablation harness")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    named = _command_named(argv)
    full = argv is None or (named is None and any(a in ("-h", "--help") for a in argv))
    for name in COMMANDS:
        if full or name == named:
            importlib.import_module(f"harness.cli.{name.replace('-', '_')}").register(sub)
        else:
            sub.add_parser(name, add_help=False)  # a name for argparse's choices; never parsed
    return parser


def _command_named(argv: list[str] | None) -> str | None:
    """The command ``argv`` names (its first word, the top-level parser has no other option), if any."""
    first = next((a for a in argv or () if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if distributed.launched() and LINUX:  # a torchrun rank (in a session of its own): it ends with its agent
        arm_parent_death_signal()
    try:
        args = build_parser(argv).parse_args(argv)
        check_environment()  # the numeric environment variables, before any command starts
        with run_temp_folder():  # this run's temp files and its children's, removed at the end
            return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM/SIGHUP in a matrix (bench.process.Interrupted): 128+sig
        print("interrupted", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
