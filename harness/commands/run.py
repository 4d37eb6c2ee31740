"""``python -m harness run --variant ckpt_lr [--preset quick] ...``: one cell.

Checks the variant's meta-gradients against its non-checkpointed reference on
the initial weights and the first task batch, meta-trains for N steps with a
progress bar, prints a summary and writes one JSON result (configuration,
environment, figures).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from harness.loop import DEVICES, DTYPES, Diverged, Experiment, RunSpec, TrainLog, check_agreement, train
from harness.provenance import environment
from harness.results import SCHEMA_VERSION, write_json

DEFAULT_OUT = Path("results/runs")


def add_spec_arguments(p: argparse.ArgumentParser, *, variant_required: bool = True) -> None:
    """The cell arguments shared by run, bench and sweep."""
    if variant_required:
        p.add_argument("--variant", required=True, help="variant name (see `list`)")
    p.add_argument("--preset", default=None, help="preset name (see `list`); default quick")
    p.add_argument("--device", default=None, help=f"one of {', '.join(DEVICES)}; default cuda when available")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps K (default: the preset's)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="off", help="mixed precision: off, fp16 (CUDA, GradScaler) or bf16")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one variant (one cell) and check its meta-gradients")
    add_spec_arguments(p)
    p.add_argument("--meta-steps", type=int, default=None, help="meta-training steps (default: the preset's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    spec = RunSpec(variant=args.variant, preset=args.preset or "quick", device=args.device or default_device(),
                   dtype=args.dtype, inner_steps=args.inner_steps, meta_batch=args.meta_batch,
                   meta_steps=args.meta_steps, seed=args.seed, amp=args.amp)
    exp = Experiment(spec)
    steps = exp.sizes["meta_steps"]
    agree = check_agreement(exp, exp.sample())
    status, message, log = "ok", None, TrainLog([])
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{spec.variant} on {spec.preset}", unit="step", file=sys.stderr,
               disable=None, leave=False)
    try:
        log = train(exp, steps, on_step=lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4g}")))
    except Diverged as exc:
        status, message = "diverged", str(exc)
    finally:
        bar.close()
    wall_s = time.perf_counter() - start
    losses = log.losses
    result = {
        "schema": SCHEMA_VERSION, "kind": "run", "status": status, "message": message,
        "spec": {**spec.__dict__, **exp.sizes}, "variant": {"name": exp.variant.name, **exp.variant.flags},
        "agreement": agree, "query_loss": losses, "final_query_loss": losses[-1] if losses else None,
        "skipped_steps": log.skipped_steps, "wall_s": wall_s, "env": environment(spec.device),
    }
    path = write_json(args.out / f"{spec.variant}_{spec.preset}_{spec.device}_{spec.dtype}{'' if spec.amp == 'off' else '_' + spec.amp}_s{spec.seed}.json", result)
    w, lr = agree["w_rel_err"], agree["lr_rel_err"]
    print(f"{spec.variant} on {spec.preset} ({spec.device}, {spec.dtype}): status {status}")
    print(f"  meta-gradient vs non-checkpointed reference: weights rel err {w:.3g}"
          + (f", LRs rel err {lr:.3g}" if lr is not None else ", no learnable LRs"))
    if "fp32_w_rel_err" in agree:
        print(f"  vs the fp32 non-checkpointed reference: weights rel err {agree['fp32_w_rel_err']:.3g}, "
              f"cosine {agree['fp32_w_cosine']:.6f}; skipped meta-steps {log.skipped_steps}")
    if losses:
        print(f"  query loss {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} meta-steps in {wall_s:.2f} s")
    if message:
        print(f"  {message}")
    print(f"  wrote {path}")
    return 0 if status == "ok" else 1
