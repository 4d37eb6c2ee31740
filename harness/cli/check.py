"""``python -m harness check --model SPEC [--tasks SPEC] [--ckpt PATTERN]``: every variant on your own model
(without ``--tasks``, the preset's task family, when its shapes fit the model).

Runs EVERY registered variant on the model and tasks as bench cells (each in its own process, float64 by
default), through :func:`harness.bench.check.run_check`: agreement with the non-checkpointed reference,
finite differences of the meta-loss for second-order variants, which variants refuse the model and why, peak
memory and time.  Writes ``<out>/<run-id>/{cells.jsonl,summary.csv,table.md}`` and ``plots/<run-id>/`` as
``bench`` does (a rerun resumes) and prints one line per variant.  Exit 0 when every variant is exact or
refused, 1 when any is wrong or failed, 2 on bad input (checked before anything is written).
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from harness.bench.check import AGREEMENT_TOL, DEFAULT_FD_DIRECTIONS, FD_TOL, check_request, run_check
from harness.bench.executors import executor_spec
from harness.bench.planner import plan_cells
from harness.bench.request import user_suffix
from harness.cli.args import (UsageError, add_matrix_arguments, check_out_dir, matrix_options, plots_root,
                              run_dir)

__all__ = ["register", "request_from_args", "run"]

TOLERANCES = (f"exact: weights and LRs within {AGREEMENT_TOL['float64']:g} (float64; float32: "
              f"{AGREEMENT_TOL['float32']:g}) of the non-checkpointed reference, and second-order variants within "
              f"{FD_TOL:g} of central finite differences (float64, h = 1e-5)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="every registered variant on your own --model and --tasks: exact, refused "
                                     "or wrong, and what each costs",
                       description=f"Every registered variant on your model, each cell isolated, in float64 unless "
                                   f"--dtype float32; the preset (default quick) gives the sizes. {TOLERANCES}. "
                                   "Exit 0 when every variant is exact or refused, 1 otherwise.")
    add_matrix_arguments(p)
    p.add_argument("--fd-directions", type=int, default=DEFAULT_FD_DIRECTIONS,
                   help=f"random directions of the finite-difference check (default {DEFAULT_FD_DIRECTIONS}; 0: none)")
    p.set_defaults(handler=run, dtype="float64", preset="quick")


def request_from_args(args: argparse.Namespace):  # noqa: ANN201 -- a MatrixRequest
    """Every option checked, the user's code run once and every output folder tried before a cell runs."""
    if args.model is None:
        raise UsageError("check needs --model SPEC (pkg.module:NAME or path/to/file.py:NAME); --tasks SPEC, or the "
                         "preset's task family when the shapes fit")
    m = matrix_options(args, multi_amp=False)
    run_id = args.run_id or f"check{user_suffix(m.user)}-{m.preset}-{m.device}-{args.dtype}"
    out_dir = run_dir(args.out, run_id)
    plots = None if args.no_plots else check_out_dir(plots_root(args.out) / run_id)
    req = check_request(m.user, m.preset, m.device, args.dtype, args.seed, m.settings, m.opts, out_dir,
                        fd_directions=args.fd_directions, plots_dir=plots, force=args.force,
                        executor=executor_spec(args))
    # --memory-budget: exit 2 before any cell if nothing fits; each cell gets the driver's plan
    return replace(req, cells=tuple(plan_cells(req.cells, warmup=m.opts.warmup > 0)))


def run(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    result = run_check(req)
    out = result.matrix
    width = max(len(v.variant) for v in result.verdicts)
    print(f"check {req.run_dir.name}: {len(out.rows)} variants in {out.wall_s:.1f} s ({TOLERANCES})")
    for v in result.verdicts:
        print(f"  {v.variant:<{width}}  {v.line}")
    print(f"  wrote {req.run_dir / 'cells.jsonl'}, {out.summary}, {out.table}"
          + (f", {len(out.plots)} plots in {out.plots[0].parent}" if out.plots else ""))
    return result.exit_code
