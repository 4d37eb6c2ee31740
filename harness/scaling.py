"""Time per meta-step for 1 and N data-parallel ranks at the same total meta-batch, interleaved (ABAB).

Why interleaved: on a shared machine the load drifts; a 1-rank run and an N-rank run launched back to back
see nearly the same load, so the per-pair ratio is steadier than a ratio of two separate medians.  Each
run is a real ``python -m harness run`` (the N-rank one under ``torch.distributed.run``) with one thread
per rank (``OMP_NUM_THREADS=1``); its ``time`` is the median over its meta-steps after one warm-up::

    python -m harness.scaling --out results/scaling-cpu --ranks 2 --pairs 7

writes ``results/scaling-cpu/scaling.json`` (every run's row, the per-pair speed-ups with median and
spread, the per-rank deterministic CPU memory figure, the time to sample one meta-batch, provenance).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from harness import distributed
from harness.reporting.files import write_json
from harness.reporting.provenance import REPO, environment
from harness.reporting.schema import SCHEMA_VERSION
from harness.train import Experiment, RunSpec

__all__ = ["launch", "measure_pairs", "sample_ms", "main"]


def launch(ranks: int, run_args: list[str], timeout_s: float = 900) -> dict[str, Any]:
    """One ``harness run`` with ``ranks`` processes (one thread each); its result row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="harness-scaling-") as tmp:
        cmd = distributed.launcher(ranks) + ["-m", "harness", "run", *run_args, "--out", tmp]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        (path,) = Path(tmp).glob("*.json")
        return json.loads(path.read_text())


def sample_ms(spec: RunSpec, repeats: int = 20) -> float:
    """Median time to draw one full meta-batch: what every rank repeats (it keeps only its share)."""
    torch.set_num_threads(1)  # as each rank
    exp = Experiment(spec)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        exp.sample()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure_pairs(ranks: int, pairs: int, run_args: list[str], log=print) -> list[dict[str, Any]]:
    """``pairs`` x (1 rank, then ``ranks`` ranks); each pair's rows and its speed-up."""
    out = []
    for i in range(pairs):
        one, many = launch(1, run_args), launch(ranks, run_args)
        speedup = one["time"]["median_ms"] / many["time"]["median_ms"]
        log(f"pair {i + 1}/{pairs}: 1 rank {one['time']['median_ms']:.1f} ms, {ranks} ranks "
            f"{many['time']['median_ms']:.1f} ms per meta-step: speed-up {speedup:.2f}x")
        out.append({"one": one, "many": many, "speedup": speedup})
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and spread of the per-pair speed-ups and of each side's time; memory per rank."""
    speedups = [p["speedup"] for p in runs]
    one_ms = [p["one"]["time"]["median_ms"] for p in runs]
    many_ms = [p["many"]["time"]["median_ms"] for p in runs]
    last = runs[-1]["many"]["distributed"]
    return {"speedup_median": statistics.median(speedups), "speedup_iqr": float(stats.iqr(speedups)),
            "speedup_min": min(speedups), "speedup_max": max(speedups),
            "one_rank_ms_median": statistics.median(one_ms), "one_rank_ms_iqr": float(stats.iqr(one_ms)),
            "many_ranks_ms_median": statistics.median(many_ms), "many_ranks_ms_iqr": float(stats.iqr(many_ms)),
            "one_rank_memory_mib": runs[-1]["one"]["memory"]["cpu_peak_alloc_mib"],
            "rank_memory_mib": last["rank_memory_mib"],
            "rank_reduce_median_ms": [statistics.median(p["many"]["distributed"]["rank_reduce_median_ms"][r]
                                                        for p in runs) for r in range(len(last["rank_memory_mib"]))]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/scaling-cpu"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--variant", default="ckpt_lr")
    p.add_argument("--preset", default="cpu-bench")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--meta-steps", type=int, default=9, help="per run; the first is the warm-up")
    args = p.parse_args(argv)
    spec = RunSpec(variant=args.variant, preset=args.preset, meta_batch=args.meta_batch, meta_steps=args.meta_steps)
    distributed.check_ranks(args.ranks, args.meta_batch)
    run_args = ["--variant", args.variant, "--preset", args.preset, "--device", "cpu",
                "--meta-batch", str(args.meta_batch), "--meta-steps", str(args.meta_steps)]
    runs = measure_pairs(args.ranks, args.pairs, run_args)
    result = {"schema": SCHEMA_VERSION, "kind": "scaling", "ranks": args.ranks, "pairs": args.pairs,
              "run_args": run_args, "threads_per_rank": 1, "sample_meta_batch_ms": sample_ms(spec),
              "summary": summarize(runs), "runs": runs, "env": environment("cpu"),
              "command": "python -m harness.scaling " + " ".join(sys.argv[1:] if argv is None else argv)}
    path = write_json(args.out / "scaling.json", result)
    s = result["summary"]
    print(f"speed-up {args.ranks} ranks vs 1: median {s['speedup_median']:.2f}x (IQR {s['speedup_iqr']:.2f}, "
          f"range {s['speedup_min']:.2f}-{s['speedup_max']:.2f}) over {args.pairs} ABAB pairs; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
