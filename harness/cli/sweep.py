"""``python -m harness sweep --variant V[,V2] --param inner_steps=1,2,4,8``: scaling curves (memory, time).

Accepted parameters: inner_steps, meta_batch (run spec), depth, width (model), step_ckpt (segment
length of step checkpointing over the variant's own; 0 = off).
Writes results/<run-id>/ (cells.jsonl, summary.csv, table.md) and
plots/<run-id>/sweep_memory.png, sweep_time.png.
"""
from __future__ import annotations

import argparse
import time

from harness.bench.cells import SWEEP_PARAMS, Cell, parse_value
from harness.bench.executors import executor_spec, open_executor
from harness.bench.matrix import run_matrix
from harness.cli.bench import add_matrix_arguments, matrix_common, resolve_variants
from harness.core.config import ConfigError
from harness.reporting.frame import flatten
from harness.reporting.render import fmt


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="scaling curves: memory and time against one parameter")
    p.add_argument("--variant", required=True, help="variant(s), comma-separated")
    p.add_argument("--param", required=True, metavar="NAME=V1,V2,...",
                   help=f"the swept parameter, one of {', '.join(SWEEP_PARAMS)}")
    add_matrix_arguments(p)
    p.set_defaults(handler=run)


def parse_param(text: str) -> tuple[str, list]:
    name, sep, vals = text.partition("=")
    name = name.strip()
    if name not in SWEEP_PARAMS:
        raise ConfigError(f"unknown --param {name!r}; accepted: {', '.join(SWEEP_PARAMS)} (as NAME=V1,V2,...)")
    values = [parse_value(v.strip()) for v in vals.split(",") if v.strip()] if sep else []
    if not values or not all(isinstance(v, int) and v >= (0 if name in ("inner_steps", "step_ckpt") else 1) for v in values):
        raise ConfigError(f"bad --param {text!r}; expected {name}=V1,V2,... with integer values")
    return name, values


def run(args: argparse.Namespace) -> int:
    from harness.reporting import tables as report

    name, values = parse_param(args.param)
    device, preset, settings, opts = matrix_common(args)
    variants = resolve_variants(args.variant)
    run_id = args.run_id or f"sweep-{preset}-{device}-{name}-{'_'.join(variants).replace(':', '-')}"
    run_dir = args.out / run_id
    cells = [Cell(v, preset, device, args.dtype, {**settings, name: x}, args.seed) for v in variants for x in values]
    with open_executor(executor_spec(args)) as executor:
        t0 = time.perf_counter()
        rows = run_matrix(cells, run_dir, opts, force=args.force, extra={"sweep_param": name}, executor=executor)
    out = report.build(run_dir, plots=not args.no_plots)
    print(f"sweep {run_id}: {len(rows)} cells in {time.perf_counter() - t0:.1f} s")
    for r in rows:
        f = flatten([r])[0]
        print(f"  {r['variant']:<18} {name}={r['settings'][name]:<4} {r['status']:<8} "
              f"mem {fmt(f['mem_mib'])} MiB  time {fmt(f['time_median_ms'])} ms")
    print(f"  wrote {out['summary']}, {out['table']}"
          + (f", plots in {out['plots'][0].parent}" if out["plots"] else ""))
    return 0
