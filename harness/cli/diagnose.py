"""``python -m harness diagnose [--device cpu|cuda] [--amp off|fp16|bf16] [--out DIR]``: the answer to the seed report.

Runs the eight variants under the report's stateful engine (reentrant and
non-reentrant checkpointing) and the functional engine on a small float64
model, measures the mechanism behind each failure, prints the table and a
short explanation, and writes ``diagnosis.md`` and ``diagnosis.json``.

``--amp fp16|bf16`` runs the same table in float32 under autocast -- for fp16
with the report's GradScaler path (on CUDA that is the user's exact setting;
on CPU it exercises the same code, CPU autocast supporting float16) -- against
the functional engine's reference at the same precision, and writes
``diagnosis-<amp>.md`` / ``.json``; the probes run in float64 only.
Full explanation: ``docs/diagnosis.md``.
"""
from __future__ import annotations

import argparse
import torch

from harness.cli.args import EXIT_FAILED, EXIT_OK, add_out_argument, check_out_dir, nonempty, results_root
from harness.core.config import AMP_MODES
from harness.studies.seed.diagnose import ENGINE_TITLES, ENGINES, explanation, run_diagnosis
from harness.settings import DEVICES, check_amp, check_device

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="reproduce and explain the seed report's failures")
    p.add_argument("--device", default="cpu", type=nonempty, help=f"one of {', '.join(DEVICES)}; default cpu")
    p.add_argument("--amp", default="off", type=nonempty,
                   help=f"mixed precision; one of {', '.join(AMP_MODES)} (default off)")
    add_out_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    check_amp(args.amp, args.device, fp16_on_cpu=True)  # the CPU GradScaler lets CI exercise the fp16 path
    check_out_dir(results_root(args.out))
    device = torch.device(args.device)
    argv = ["python -m harness diagnose", f"--device {args.device}"]
    if args.amp != "off":
        argv.append(f"--amp {args.amp}")
    if args.out is not None:
        argv.append(f"--out {args.out}")
    done = run_diagnosis(device, args.amp, results_root(args.out), " ".join(argv))
    result, json_path, md_path = done.result, done.json_path, done.md_path

    width = max(len(v) for v in result.table)
    if args.amp == "off":
        print(f"diagnosis on {device} (float64, torch {result.env['torch']}): meta-gradients vs the functional "
              "non-checkpointed reference")
    else:
        print(f"diagnosis on {device} (float32 + autocast {args.amp}"
              + (" + GradScaler" if args.amp == "fp16" else "") + f", torch {result.env['torch']}): "
              f"meta-gradients vs the functional non-checkpointed reference at the same precision "
              f"(ok: rel err <= {result.tolerance:g}); [vs float64: ...] against the float64 reference")
    for engine in ENGINES:
        print(f"\n  {ENGINE_TITLES[engine]}:")
        for variant, row in result.table.items():
            print(f"    {variant:<{width}}  {row[engine]['text']}")
    diffs = result.differences
    print("\nreproduces the team's table" if not diffs else "\ndifferences from the team's table:")
    for d in diffs:
        print(f"  {d}")
    failed = [n for n, p in result.probes.items() if not p.get("holds")]
    if result.probes:
        print(f"probes: {len(result.probes) - len(failed)}/{len(result.probes)} hold"
              + (f"; NOT holding: {', '.join(failed)}" if failed else ""))
    else:
        print("probes: float64 only (run without --amp)")
    print()
    print(explanation(result))
    print(f"\nwrote {md_path} and {json_path}; full explanation in docs/diagnosis.md")
    ok = not failed and all(row["functional"]["status"] == "ok" for row in result.table.values())
    return EXIT_OK if ok else EXIT_FAILED
