"""``python -m harness run --variant ckpt_lr [--preset quick] ...``: one cell, in this process.

Parses and checks the options (``--model``/``--tasks``/``--ckpt``: your own model and tasks, built and run
once on one task before anything is written), calls :func:`harness.bench.single.run_single` (meta-gradient check,
memory figure, meta-training, one JSON result under ``<out>/runs/``) and prints the summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.bench.measure import noise_warning
from harness.bench.single import SingleRun, result_path, run_single
from harness.cli.args import (EXIT_FAILED, EXIT_OK, UsageError, add_out_argument, add_spec_arguments, check_numbers,
                              check_out_dir, check_user_code, default_device, merge_flags, results_root,
                              user_specs)
from harness.loop.spec import RunSpec
from harness.settings import check_device, check_memory_snapshot, parse_settings, split_settings

__all__ = ["register", "run", "spec_from_args"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one variant (one cell) and check its meta-gradients")
    add_spec_arguments(p)
    p.add_argument("--meta-steps", type=int, default=None, help="meta-training steps (default: the preset's)")
    add_out_argument(p)
    p.add_argument("--memory-snapshot", type=Path, default=None, metavar="PATH",
                   help="CUDA only: record the allocator history over one meta-step and dump a snapshot "
                        "(open it at https://pytorch.org/memory_viz)")
    p.set_defaults(handler=run)


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The checked run spec, carrying its ``--set`` settings; a UsageError/ConfigError before anything runs."""
    check_numbers(args)
    device = args.device if args.device is not None else default_device()
    check_device(device)
    preset = args.preset if args.preset is not None else "quick"
    user = user_specs(args)
    parts = split_settings(merge_flags(args, parse_settings(args.set, preset, allow_huge=args.allow_huge,
                                                            model=user.model, tasks=user.tasks), preset))
    if parts.launch:
        raise UsageError("--set ranks is for bench and sweep; run one cell data-parallel with "
                         "python -m torch.distributed.run --nproc-per-node N -m harness run ...")
    spec = RunSpec(variant=args.variant, preset=preset, device=device, dtype=args.dtype, meta_steps=args.meta_steps,
                   seed=args.seed, **parts.spec, **user.fields(), settings=parts)
    check_user_code(preset, user, parts, args.dtype)
    return spec


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    snapshot = args.memory_snapshot
    if snapshot is not None:
        check_memory_snapshot(spec.device)
        check_out_dir(snapshot.parent, flag="--memory-snapshot")
    out = results_root(args.out)
    check_out_dir(result_path(out, spec).parent)
    res = run_single(spec, out, snapshot=snapshot)
    if res.main and res.path is None:  # a rank failed: nothing was written
        print(f"error: {res.result.message}", file=sys.stderr)
    elif res.main:
        for line in summary_lines(res):
            print(line)
    return EXIT_OK if res.ok else EXIT_FAILED


def summary_lines(res: SingleRun) -> list[str]:
    r = res.result
    spec, agree, losses, memory, timing = r.spec, r.agreement, r.query_loss, r.memory, r.time
    w, lr = agree["w_rel_err"], agree["lr_rel_err"]
    lines = [f"{spec['variant']} on {spec['preset']} ({spec['device']}, {spec['dtype']}): status {r.status}",
             f"  meta-gradient vs non-checkpointed reference: weights rel err {w:.3g}"
             + (f", LRs rel err {lr:.3g}" if lr is not None else ", no learnable LRs")]
    if "fp32_w_rel_err" in agree:
        lines.append(f"  vs the fp32 non-checkpointed reference: weights rel err {agree['fp32_w_rel_err']:.3g}, "
                     f"cosine {agree['fp32_w_cosine']:.6f}; skipped meta-steps {r.skipped_steps}")
    if r.fidelity:
        f = r.fidelity
        lines.append(f"  fidelity vs the exact meta-gradient: weights cosine {f['w_cosine']:.6f}, rel err "
                     f"{f['w_rel_err']:.3g}" + (f"; LRs cosine {f['lr_cosine']:.6f}" if f.get("lr_cosine") is not None
                                                else "") + (f"; CG residual {f['cg_residual']:.3g}"
                                                            if f.get("cg_residual") is not None else ""))
    if losses:
        lines.append(f"  query loss {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} meta-steps "
                     f"in {r.wall_s:.2f} s")
    mem = f"  memory: CPU peak live {memory['cpu_peak_alloc_mib']:.4g} MiB per meta-step (deterministic)"
    if "cuda_peak_alloc_mib" in memory:
        mem += (f"; CUDA peak allocated {memory['cuda_peak_alloc_mib']:.1f} MiB "
                f"({memory['cuda_peak_alloc_above_base_mib']:.1f} above base)")
    lines.append(mem)
    if r.plan:
        budget = r.settings.get("memory_budget")
        budget_text = f"memory budget {budget / 2 ** 20:.4g} MiB" if budget else "memory budget"
        lines.append(f"  plan ({budget_text}): {r.plan}, predicted peak {r.predicted_peak_mib:.4g} "
                     f"MiB, measured {memory['cpu_peak_alloc_mib']:.4g} MiB")
    dist = r.distributed or {}
    if (dist.get("world_size") or 1) > 1:
        lines.append(f"  {dist['world_size']} ranks ({dist['backend']}): per-rank CPU peak "
                     + ", ".join(f"{m:.4g}" for m in dist["rank_memory_mib"]) + " MiB")
    if timing["count"]:
        lines.append(f"  time per meta-step: median {timing['median_ms']:.2f} ms, IQR {timing['iqr_ms']:.2f} ms, "
                     f"min {timing['min_ms']:.2f} ms over {timing['count']} steps (after 1 warm-up)")
        warn = noise_warning(timing, spec["variant"])
        if warn:
            lines.append(f"  {warn}")
    if memory.get("snapshot"):
        lines.append(f"  wrote CUDA memory snapshot {memory['snapshot']}")
    if r.message:
        lines.append(f"  {r.message}")
    lines.append(f"  wrote {res.path}")
    return lines
