"""Time per meta-step for 1 and N data-parallel ranks at the same total meta-batch, interleaved (ABAB).

Why interleaved: on a shared machine the load drifts; a 1-rank run and an N-rank run launched back to back
see nearly the same load, so the per-pair ratio is steadier than a ratio of two separate medians.  Each
run is a real ``python -m harness run`` (the N-rank one under ``torch.distributed.run``) with one thread
per rank (``OMP_NUM_THREADS=1``); its ``time`` is the median over its meta-steps after one warm-up::

    python -m harness scaling --out results --run-id scaling-cpu --ranks 2 --pairs 7

writes ``results/scaling-cpu/scaling.json``, a :class:`~harness.reporting.schema.ScalingResult` (every
run's row, the per-pair speed-ups with median and spread, the per-rank deterministic CPU memory figure,
the time to sample one meta-batch, provenance).  The command is :mod:`harness.cli.scaling`.

Stopping it (SIGINT, SIGTERM, SIGHUP: exit 130, 143, 129) kills the running ``harness run`` and all it started
(its own process group: both torchrun ranks too) and removes its ``harness-scaling-*`` folder; a SIGKILLed
driver takes the child with it (its parent-death signal, ``harness.bench.process.child_group``).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from scipy import stats

from harness.bench.process import child_group, signals_as_interrupts
from harness.loop import distributed
from harness.core.config import ConfigError
from harness.settings import check_ranks
from harness.reporting.files import read_row, write_json
from harness.reporting.provenance import REPO, environment
from harness.reporting.schema import RunResult, ScalingResult
from harness.loop.spec import Experiment, RunSpec

__all__ = ["RESULT_FILE", "ScalingRequest", "launch", "measure_pairs", "run_scaling", "sample_ms", "summarize"]

RESULT_FILE = "scaling.json"  # in <out>/<run-id>/


@dataclass(frozen=True)
class ScalingRequest:
    """What to measure, checked at construction (a ConfigError naming the option, before anything runs)."""

    ranks: int = 2
    pairs: int = 7
    variant: str = "ckpt_lr"
    preset: str = "cpu-bench"
    meta_batch: int = 8
    meta_steps: int = 9  # per run; the first is the warm-up

    def __post_init__(self) -> None:
        self.spec()  # the variant, preset and sizes, as every run will check them
        check_ranks(self.ranks, self.meta_batch)
        if self.pairs < 1:
            raise ConfigError(f"--pairs must be at least 1, got {self.pairs}")
        if self.meta_steps < 2:
            raise ConfigError(f"--meta-steps must be at least 2 (one warm-up, one timed), got {self.meta_steps}")

    def spec(self) -> RunSpec:
        return RunSpec(variant=self.variant, preset=self.preset, meta_batch=self.meta_batch,
                       meta_steps=self.meta_steps)

    def run_args(self) -> list[str]:
        """The arguments of every ``python -m harness run``."""
        return ["--variant", self.variant, "--preset", self.preset, "--device", "cpu",
                "--meta-batch", str(self.meta_batch), "--meta-steps", str(self.meta_steps)]


def launch(ranks: int, run_args: list[str], timeout_s: float = 900) -> dict[str, Any]:
    """One ``harness run`` with ``ranks`` processes (one thread each); its result row (read as a RunResult)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="harness-scaling-") as tmp:
        cmd = distributed.launcher(ranks) + ["-m", "harness", "run", *run_args, "--out", tmp]
        with open(Path(tmp) / "stderr.txt", "w+") as err:
            # a time-out, Ctrl-C, SIGTERM/SIGHUP: nothing it started keeps running (child_group)
            with child_group(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err) as proc:
                rc = proc.wait(timeout=timeout_s)
            err.seek(0)
            if rc != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {rc}: {err.read().strip()[-500:]}")
        (path,) = Path(tmp).glob("runs/*.json")  # harness run writes <out>/runs/<name>.json
        return read_row(path, RunResult).to_dict()


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


def measure_pairs(ranks: int, pairs: int, run_args: list[str],
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
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


def run_scaling(request: ScalingRequest, out_dir: Path, command: str = "",
                log: Callable[[str], None] = print) -> ScalingResult:
    """``request.pairs`` ABAB pairs, summarised; written to ``out_dir/scaling.json`` and returned."""
    with signals_as_interrupts():  # SIGTERM/SIGHUP stop it as Ctrl-C does: the running child killed
        runs = measure_pairs(request.ranks, request.pairs, request.run_args(), log)
        result = ScalingResult(ranks=request.ranks, pairs=request.pairs, run_args=request.run_args(),
                               threads_per_rank=1, sample_meta_batch_ms=sample_ms(request.spec()),
                               summary=summarize(runs), runs=runs, env=environment("cpu"), command=command)
        write_json(Path(out_dir) / RESULT_FILE, result)
    return result
