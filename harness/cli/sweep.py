"""``python -m harness sweep --variant V[,V2] --param inner_steps=1,2,4,8``: scaling curves (memory, time).

Accepted parameters: inner_steps, meta_batch (run spec), depth, width (model), step_ckpt (segment
length of step checkpointing over the variant's own; 0 = off); repeated values count once.
Writes <out>/<run-id>/ (cells.jsonl, summary.csv, table.md) and plots/<run-id>/sweep_memory.png,
sweep_time.png (<out>/plots/<run-id>/ with an explicit --out).  Exit codes as bench.
"""
from __future__ import annotations

import argparse

from harness.bench.request import MatrixRequest, plan, resolve_variants, run_request, user_suffix
from harness.bench.executors import executor_spec
from harness.bench.planner import plan_cells
from harness.cli.args import (UsageError, add_matrix_arguments, check_out_dir, matrix_options, nonempty, plots_root,
                              run_dir)
from harness.reporting.frame import flatten
from harness.reporting.render import fmt as fmt_number
from harness.settings import SWEEP_PARAMS, parse_param

__all__ = ["register", "request_from_args", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="scaling curves: memory and time against one parameter")
    p.add_argument("--variant", required=True, type=nonempty, help="variant(s), comma-separated")
    p.add_argument("--param", required=True, metavar="NAME=V1,V2,...",
                   help=f"the swept parameter, one of {', '.join(SWEEP_PARAMS)}")
    add_matrix_arguments(p)
    p.set_defaults(handler=run)


def request_from_args(args: argparse.Namespace) -> MatrixRequest:
    """Every option checked and every output folder tried before a cell runs."""
    m = matrix_options(args, multi_amp=False)
    name, values = parse_param(args.param, m.preset, allow_huge=args.allow_huge, model=m.user.model)
    if name in m.settings:
        raise UsageError(f"--param {name} is swept; do not also fix it (--set {name}={m.settings[name]} or its flag)")
    variants = resolve_variants(args.variant)
    run_id = args.run_id or (f"sweep-{m.preset}{user_suffix(m.user)}-{m.device}-{name}-"
                             f"{'_'.join(variants).replace(':', '-')}")
    out_dir = run_dir(args.out, run_id)
    plots = None if args.no_plots else check_out_dir(plots_root(args.out) / run_id)
    cells = plan(variants, m.preset, m.device, args.dtype, args.seed, m.settings, m.amps, sweep=(name, values),
                 user=m.user)
    cells = tuple(plan_cells(cells, warmup=m.opts.warmup > 0))  # --memory-budget: exit 2 before any cell if nothing fits
    return MatrixRequest(cells, out_dir, m.opts, force=args.force, plots_dir=plots,
                         extra={"sweep_param": name}, executor=executor_spec(args))


def run(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    name = req.extra["sweep_param"]
    outcome = run_request(req)
    print(f"sweep {req.run_dir.name}: {len(outcome.rows)} cells in {outcome.wall_s:.1f} s")
    for r, f in zip(outcome.rows, flatten(outcome.rows)):
        print(f"  {r.variant:<18} {name}={r.settings[name]:<4} {r.status:<8} "
              f"mem {fmt_number(f['mem_mib'])} MiB  time {fmt_number(f['time_median_ms'])} ms")
    print(f"  wrote {outcome.summary}, {outcome.table}"
          + (f", plots in {outcome.plots[0].parent}" if outcome.plots else ""))
    return outcome.exit_code
