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

from harness import distributed
from harness.train import DEVICES, DTYPES, Diverged, Experiment, RunSpec, TrainLog, check_agreement, default_threads, train
from harness.core.config import ConfigError
from harness.bench.measure import MIB, StepRunner, measure_cpu_memory, noise_warning, snapshot_meta_step, time_stats
from harness.reporting.provenance import environment
from harness.reporting.schema import SCHEMA_VERSION, RunResult, write_json

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
    p.add_argument("--memory-snapshot", type=Path, default=None, metavar="PATH",
                   help="CUDA only: record the allocator history over one meta-step and dump a snapshot "
                        "(open it at https://pytorch.org/memory_viz)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """One cell; under torchrun, data-parallel over the ranks (harness.distributed), rank 0 reporting."""
    spec = RunSpec(variant=args.variant, preset=args.preset or "quick", device=args.device or default_device(),
                   dtype=args.dtype, inner_steps=args.inner_steps, meta_batch=args.meta_batch,
                   meta_steps=args.meta_steps, seed=args.seed, amp=args.amp)
    with distributed.session(spec.device, spec.resolved()["meta_batch"]) as group:
        return run_spec(args, spec, group)


def run_spec(args: argparse.Namespace, spec: RunSpec, group: distributed.DataParallel | None) -> int:
    # over 60 lines: the one cell read top to bottom (check, measure, train, record, print)
    snapshot = getattr(args, "memory_snapshot", None)
    if snapshot is not None and spec.device != "cuda":
        raise ConfigError("--memory-snapshot needs CUDA (it records the CUDA allocator history); "
                          f"this run is on {spec.device}")
    exp = Experiment(spec)
    main = group is None or group.main
    threads = default_threads(spec.device, exp.learner.model)
    if threads:
        torch.set_num_threads(threads)
    steps = exp.sizes["meta_steps"]
    agree = check_agreement(exp, exp.sample())
    memory = side_measurements(exp, snapshot)
    status, message, log = "ok", None, TrainLog([])
    start = time.perf_counter()
    stamps = [start]
    if spec.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    bar = tqdm(total=steps, desc=f"{spec.variant} on {spec.preset}", unit="step", file=sys.stderr,
               disable=None if main else True, leave=False)
    try:
        log = train(exp, steps, on_step=lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4g}"),
                                                         stamps.append(_now(spec.device))))
    except Diverged as exc:
        status, message = "diverged", str(exc)
    except distributed.RankFailed as exc:  # every rank ends here at once; rank 0 says which rank failed
        if main:
            print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    wall_s = time.perf_counter() - start
    if spec.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        memory.update(cuda_peak_alloc_mib=peak / MIB, cuda_peak_alloc_above_base_mib=(peak - cuda_base) / MIB,
                      cuda_peak_reserved_mib=torch.cuda.max_memory_reserved() / MIB)
    step_s = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first meta-step is the warm-up
    timing = time_stats(step_s)
    losses = log.losses
    ranks_info = distributed.single_process_summary(memory) if group is None else group.summary(memory)
    if not main:
        return 0 if status == "ok" else 1
    result = {
        "schema": SCHEMA_VERSION, "kind": "run", "status": status, "message": message,
        "spec": {**spec.__dict__, **exp.sizes}, "variant": {"name": exp.variant.name, **exp.variant.flags},
        "agreement": agree, "query_loss": losses, "final_query_loss": losses[-1] if losses else None,
        "skipped_steps": log.skipped_steps, "wall_s": wall_s, "memory": memory, "time": timing,
        "env": environment(spec.device), "distributed": ranks_info,
    }
    ranks = "" if group is None else f"_r{group.world}"
    path = write_json(args.out / f"{spec.variant}_{spec.preset}_{spec.device}_{spec.dtype}{'' if spec.amp == 'off' else '_' + spec.amp}_s{spec.seed}{ranks}.json", RunResult.from_dict(result, "run result"))
    w, lr = agree["w_rel_err"], agree["lr_rel_err"]
    print(f"{spec.variant} on {spec.preset} ({spec.device}, {spec.dtype}): status {status}")
    print(f"  meta-gradient vs non-checkpointed reference: weights rel err {w:.3g}"
          + (f", LRs rel err {lr:.3g}" if lr is not None else ", no learnable LRs"))
    if "fp32_w_rel_err" in agree:
        print(f"  vs the fp32 non-checkpointed reference: weights rel err {agree['fp32_w_rel_err']:.3g}, "
              f"cosine {agree['fp32_w_cosine']:.6f}; skipped meta-steps {log.skipped_steps}")
    if losses:
        print(f"  query loss {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} meta-steps in {wall_s:.2f} s")
    mem_line = f"  memory: CPU peak live {memory['cpu_peak_alloc_mib']:.4g} MiB per meta-step (deterministic)"
    if "cuda_peak_alloc_mib" in memory:
        mem_line += (f"; CUDA peak allocated {memory['cuda_peak_alloc_mib']:.1f} MiB "
                     f"({memory['cuda_peak_alloc_above_base_mib']:.1f} above base)")
    print(mem_line)
    if group is not None:
        print(f"  {group.world} ranks ({group.backend}): per-rank CPU peak "
              + ", ".join(f"{m:.4g}" for m in ranks_info["rank_memory_mib"]) + " MiB")
    if timing["count"]:
        print(f"  time per meta-step: median {timing['median_ms']:.2f} ms, IQR {timing['iqr_ms']:.2f} ms, "
              f"min {timing['min_ms']:.2f} ms over {timing['count']} steps (after 1 warm-up)")
        warn = noise_warning(timing, spec.variant)
        if warn:
            print(f"  {warn}")
    if memory.get("snapshot"):
        print(f"  wrote CUDA memory snapshot {memory['snapshot']}")
    if message:
        print(f"  {message}")
    print(f"  wrote {path}")
    return 0 if status == "ok" else 1


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def side_measurements(exp: Experiment, snapshot: Path | None) -> dict:
    """The deterministic CPU memory figure of one meta-step (and the CUDA snapshot), on a copy of the
    learner and of the task stream, so the training run itself is unchanged."""
    import copy

    learner = copy.deepcopy(exp.learner)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(exp.gen.get_state())

    def sample() -> list:
        return exp.sample(gen)

    state = torch.get_rng_state()
    step = StepRunner(learner, exp.sizes["outer_lr"], sample, scaler=exp.new_scaler(), check_finite=False)
    out: dict = measure_cpu_memory(step, sample())
    if snapshot is not None:
        out["snapshot"] = snapshot_meta_step(step, snapshot, exp.device)
    torch.set_rng_state(state)
    return out
