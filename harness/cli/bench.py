"""``python -m harness bench``: every registered variant on the device's default preset, each cell isolated.

GPU: preset ``seed``; CPU: ``cpu-bench``.  Writes ``<out>/<run-id>/cells.jsonl``, ``summary.csv``,
``table.md`` and ``plots/<run-id>/*.png`` (``<out>/plots/<run-id>/`` with an explicit ``--out``).  Re-running the same run-id resumes
(finished cells are skipped) unless ``--force``.

``--peers`` adds ``higher:<v>``, ``torchopt:<v>`` and ``torch_maml:<v>`` for every canonical variant ``v``
in the matrix, and ``torch_maml:sckpt`` beside ``sckpt`` (those a peer cannot express, or all of them when the ``peers`` extra is absent, are
recorded ``unsupported`` with the reason).  ``--amp off,bf16[,fp16]`` makes precision a
dimension.  ``--model``/``--tasks``/``--ckpt`` run the matrix on your own model and tasks (checked up front,
:mod:`harness.zoo.user`).  Exit 0 when every cell is ok or unsupported, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse

from harness.bench.request import (MatrixOutcome, MatrixRequest, add_peer_cells, default_run_id, plan,
                                  resolve_variants, run_request)
from harness.bench.executors import executor_spec
from harness.settings import parse_mem_caps
from harness.bench.planner import plan_cells
from harness.cli.args import add_matrix_arguments, check_out_dir, matrix_options, nonempty, plots_root, run_dir

__all__ = ["register", "request_from_args", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run every registered variant on the device's default preset (isolated cells)")
    add_matrix_arguments(p)
    p.add_argument("--variants", default=None, type=nonempty,
                   help="comma-separated variants (default: all registered); peer cells as peer:variant, "
                        "e.g. higher:maml")
    p.add_argument("--peers", action="store_true",
                   help="add higher:<v>, torchopt:<v> and torch_maml:<v> for every canonical variant v in the "
                        "matrix, and the peer cells of other variants a peer can express (torch_maml:sckpt); "
                        "unsupported ones are listed with the reason")
    p.set_defaults(handler=run)


def request_from_args(args: argparse.Namespace) -> MatrixRequest:
    """Every option checked and every output folder tried before a cell runs."""
    m = matrix_options(args, multi_amp=True)
    variants = resolve_variants(args.variants)
    if args.peers:
        variants = add_peer_cells(variants)
    caps = parse_mem_caps(args.cpu_mem_cap)
    amp_key = {"amp": ",".join(m.amps)} if m.amps != ["off"] else {}
    peers = "-peers" if args.peers else ""
    run_id = args.run_id or default_run_id(m.preset, m.device, {**m.settings, **amp_key}, m.user) + peers
    out_dir = run_dir(args.out, run_id)
    plots = None if args.no_plots else check_out_dir(plots_root(args.out) / run_id)
    cells = plan(variants, m.preset, m.device, args.dtype, args.seed, m.settings, m.amps, user=m.user)
    cells = tuple(plan_cells(cells, warmup=m.opts.warmup > 0))  # --memory-budget: exit 2 before any cell if nothing fits
    return MatrixRequest(cells, out_dir, m.opts, caps=caps, force=args.force, plots_dir=plots,
                         executor=executor_spec(args))


def run(args: argparse.Namespace) -> int:
    req = request_from_args(args)
    outcome = run_request(req)
    print(f"bench {req.run_dir.name}: {len(outcome.rows)} cells "
          f"({', '.join(f'{n} {s}' for s, n in outcome.counts.items())}) in {outcome.wall_s:.1f} s")
    print(f"  wrote {req.run_dir / 'cells.jsonl'}, {outcome.summary}, {outcome.table}" + plots_note(outcome))
    return outcome.exit_code


def plots_note(outcome: MatrixOutcome) -> str:
    return f", {len(outcome.plots)} plots in {outcome.plots[0].parent}" if outcome.plots else ""
