"""``python -m harness diagnose [--device cpu|cuda] [--out DIR]``: the answer to the seed report.

Runs the eight variants under the report's stateful engine (reentrant and
non-reentrant checkpointing) and the functional engine on a small float64
model, measures the mechanism behind each failure, prints the table and a
short explanation, and writes ``diagnosis.md`` and ``diagnosis.json``.
Full explanation: ``docs/diagnosis.md``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from harness.cli import UsageError
from harness.diagnose import ENGINE_TITLES, ENGINES, SHORT_EXPLANATION, diagnose, markdown
from harness.provenance import environment
from harness.results import SCHEMA_VERSION, write_json, write_text_atomic

DEFAULT_OUT = Path("results")
DEVICES = ("cpu", "cuda")
AMP_MODES = ("off",)  # fp16 / bf16 come with the mixed-precision work


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="reproduce and explain the seed report's failures")
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)}; default cpu")
    p.add_argument("--amp", default="off", help=f"mixed precision; one of {', '.join(AMP_MODES)} (default off)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.device not in DEVICES:
        raise UsageError(f"unknown device {args.device!r}; valid devices: {', '.join(DEVICES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available on this machine; use --device cpu")
    if args.amp not in AMP_MODES:
        raise UsageError(f"unknown --amp {args.amp!r}; valid: {', '.join(AMP_MODES)}")
    device = torch.device(args.device)
    argv = ["python -m harness diagnose", f"--device {args.device}"]
    if args.out != DEFAULT_OUT:
        argv.append(f"--out {args.out}")
    result = {"schema": SCHEMA_VERSION, "kind": "diagnosis", "command": " ".join(argv), "amp": args.amp,
              **diagnose(device), "env": environment(device)}
    md = markdown(result)
    json_path = write_json(args.out / "diagnosis.json", result)
    md_path = write_text_atomic(args.out / "diagnosis.md", md)

    width = max(len(v) for v in result["table"])
    print(f"diagnosis on {device} (float64, torch {result['env']['torch']}): meta-gradients vs the functional "
          "non-checkpointed reference")
    for engine in ENGINES:
        print(f"\n  {ENGINE_TITLES[engine]}:")
        for variant, row in result["table"].items():
            print(f"    {variant:<{width}}  {row[engine]['text']}")
    diffs = result["differences"]
    print("\nreproduces the team's table" if not diffs else "\ndifferences from the team's table:")
    for d in diffs:
        print(f"  {d}")
    failed = [n for n, p in result["probes"].items() if not p.get("holds")]
    print(f"probes: {len(result['probes']) - len(failed)}/{len(result['probes'])} hold"
          + (f"; NOT holding: {', '.join(failed)}" if failed else ""))
    print()
    print(SHORT_EXPLANATION)
    print(f"\nwrote {md_path} and {json_path}; full explanation in docs/diagnosis.md")
    return 0 if not failed and all(row["functional"]["status"] == "ok" for row in result["table"].values()) else 1
