"""``python -m harness scaling [--ranks 2] [--pairs 7] [--out DIR] [--run-id scaling-cpu]``: 1 vs N ranks.

Times ``--pairs`` ABAB pairs of ``python -m harness run`` on the CPU, one process then ``--ranks``
data-parallel ranks (one thread each) at the same total meta-batch, and writes
``<out>/<run-id>/scaling.json`` (the work: :mod:`harness.bench.scaling`; the figures: docs/scaling.md).
Every option is checked, and the output folder tried, before the first run starts.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from harness.cli.args import EXIT_OK, add_out_argument, check_numbers, nonempty, run_dir
from harness.bench.scaling import RESULT_FILE, ScalingRequest, run_scaling

__all__ = ["DEFAULT_RUN_ID", "command_line", "register", "request_from_args", "run"]

DEFAULT_RUN_ID = "scaling-cpu"


def register(sub: argparse._SubParsersAction) -> None:
    d = {f.name: f.default for f in fields(ScalingRequest)}  # the defaults live in one place
    p = sub.add_parser("scaling", help="time per meta-step of 1 vs N data-parallel CPU ranks, in ABAB pairs")
    p.add_argument("--ranks", type=int, default=d["ranks"], help="ranks of the N-rank runs (default %(default)s)")
    p.add_argument("--pairs", type=int, default=d["pairs"], help="ABAB pairs (default %(default)s)")
    p.add_argument("--variant", default=d["variant"], type=nonempty, help="variant (default %(default)s)")
    p.add_argument("--preset", default=d["preset"], type=nonempty, help="preset (default %(default)s)")
    p.add_argument("--meta-batch", type=int, default=d["meta_batch"],
                   help="total tasks per meta-step, split over the ranks (default %(default)s)")
    p.add_argument("--meta-steps", type=int, default=d["meta_steps"],
                   help="meta-steps per run; the first is the warm-up (default %(default)s)")
    p.add_argument("--run-id", default=DEFAULT_RUN_ID, type=nonempty,
                   help="<out>/<run-id>/scaling.json (default %(default)s)")
    add_out_argument(p)
    p.set_defaults(handler=run)


def request_from_args(args: argparse.Namespace) -> ScalingRequest:
    check_numbers(args)
    return ScalingRequest(ranks=args.ranks, pairs=args.pairs, variant=args.variant, preset=args.preset,
                          meta_batch=args.meta_batch, meta_steps=args.meta_steps)


def command_line(req: ScalingRequest, args: argparse.Namespace) -> str:
    """The command line that reproduces the measurement (every option spelled out)."""
    parts = ["python -m harness scaling", f"--ranks {req.ranks}", f"--pairs {req.pairs}", f"--variant {req.variant}",
             f"--preset {req.preset}", f"--meta-batch {req.meta_batch}", f"--meta-steps {req.meta_steps}"]
    if args.out is not None:
        parts.append(f"--out {args.out}")
    return " ".join(parts + [f"--run-id {args.run_id}"])


def run(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    out_dir = run_dir(args.out, args.run_id)
    result = run_scaling(req, out_dir, command=command_line(req, args))
    s = result.summary
    print(f"speed-up {req.ranks} ranks vs 1: median {s['speedup_median']:.2f}x (IQR {s['speedup_iqr']:.2f}, "
          f"range {s['speedup_min']:.2f}-{s['speedup_max']:.2f}) over {req.pairs} ABAB pairs; "
          f"wrote {out_dir / RESULT_FILE}")
    return EXIT_OK
