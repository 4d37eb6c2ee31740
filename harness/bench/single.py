"""One cell in this process, meta-trained and measured: the library behind ``python -m harness run``.

Checks the variant's meta-gradients against its non-checkpointed reference on the initial weights
and the first task batch, takes the deterministic CPU memory figure of one meta-step on a copy of
the learner and of the task stream (so the run itself is unchanged), meta-trains for N steps
(CUDA allocator peaks over the training when on a GPU) and writes one JSON result.  Under torchrun
the training is data-parallel over the ranks (:mod:`harness.loop.distributed`) and rank 0 writes.
Try: ``python -m harness run --variant ckpt_lr --preset quick``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from harness.loop import distributed
from harness.bench.measure import CudaPeaks, measure_cpu_memory, snapshot_meta_step, time_stats
from harness.bench.planner import plan_experiment
from harness.loop.train import StepRunner
from harness.reporting.files import write_json
from harness.reporting.provenance import environment
from harness.reporting.schema import RunResult
from harness.settings import check_memory_snapshot
from harness.loop.agreement import check_meta_gradients
from harness.loop.spec import Experiment, RunSpec, default_threads
from harness.loop.train import Diverged, TrainLog, train
from harness.zoo.user import UserSpecs, spec_name

__all__ = ["SingleRun", "result_path", "run_single", "side_measurements"]


@dataclass(frozen=True)
class SingleRun:
    """What ``run`` prints: the result as written and where (rank 0), or the failure of a rank."""

    path: Path | None  # None: not written (another rank than 0, or a rank failed)
    result: RunResult  # as written (rank 0), or a rank's failure (status error)
    main: bool = True  # rank 0, or a one-process run: the one that reports

    @property
    def ok(self) -> bool:
        return self.result.status == "ok"


def result_path(out: Path, spec: RunSpec, world: int | None = None) -> Path:
    """``<out>/runs/<variant>_<preset>[_<model>-<hash>]_<device>_<dtype>[_<amp>]_s<seed>[_r<ranks>].json``; the
    hash is of the ``--model``/``--tasks``/``--ckpt`` given, so a user model's run never overwrites the preset's."""
    amp = "" if spec.amp == "off" else "_" + spec.amp
    ranks = "" if world is None else f"_r{world}"
    user = UserSpecs(spec.model, spec.tasks, spec.ckpt)
    own = ""
    if user.given:
        digest = hashlib.sha1(json.dumps([spec.model, spec.tasks, list(spec.ckpt)]).encode()).hexdigest()[:8]
        own = f"_{spec_name(spec.model) if spec.model else 'own'}-{digest}"
    name = f"{spec.variant}_{spec.preset}{own}_{spec.device}_{spec.dtype}{amp}_s{spec.seed}{ranks}.json"
    return Path(out) / "runs" / name


def run_single(spec: RunSpec, out: Path, *, snapshot: Path | None = None, progress: bool | None = None) -> SingleRun:
    """Check, measure and meta-train one cell (data-parallel under torchrun); a diverging run is a result
    with status ``diverged``, a failing rank one with status ``error`` that nobody writes."""
    if snapshot is not None:
        check_memory_snapshot(spec.device)
    # every rank's resolved configuration must match (a different --seed on one: exit 2 naming it)
    sizes = spec.resolved()
    config = {**spec.fields(), **sizes, **spec.settings.flat()}
    with distributed.session(spec.device, sizes["meta_batch"], config) as group:
        return _run(spec, out, snapshot, progress, group)


def _run(spec: RunSpec, out: Path, snapshot: Path | None, progress: bool | None,
         group: distributed.DataParallel | None) -> SingleRun:
    exp, plan = plan_experiment(Experiment(spec), warmup=False)  # as side_measurements: no warm-up step
    main = group is None or group.main
    threads = default_threads(spec.device, exp.learner.model)
    if threads:
        torch.set_num_threads(threads)
    agree, fidelity = check_meta_gradients(exp, exp.sample())
    memory = side_measurements(exp, snapshot)
    status, message, log, stamps = "ok", None, TrainLog([]), [time.perf_counter()]
    bar = tqdm(total=exp.sizes["meta_steps"], desc=f"{spec.variant} on {spec.preset}", unit="step", file=sys.stderr,
               disable=True if not main else None if progress is None else not progress, leave=False)

    def on_step(i: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
        stamps.append(_now(spec.device))

    peaks = CudaPeaks(spec.device) if spec.device == "cuda" else None
    try:
        with peaks or nullcontext():
            log = train(exp, exp.sizes["meta_steps"], on_step=on_step)
    except Diverged as exc:
        status, message = "diverged", str(exc)
    except distributed.RankFailed as exc:  # every rank ends here at once; rank 0 says which rank failed
        return SingleRun(None, RunResult(status="error", message=str(exc)), main)
    finally:
        bar.close()
    wall_s = time.perf_counter() - stamps[0]
    memory.update(peaks.figures if peaks is not None else {})
    ranks_info = distributed.single_process_summary(memory) if group is None else group.summary(memory)
    user = {k: list(v) if k == "ckpt" else v for k, v in UserSpecs(spec.model, spec.tasks, spec.ckpt).fields().items()}
    result = RunResult(status=status, message=message, spec={**spec.fields(), **exp.sizes},
                       variant={"name": exp.variant.name, **exp.variant.flags}, agreement=agree, fidelity=fidelity,
                       query_loss=log.losses, final_query_loss=log.losses[-1] if log.losses else None,
                       skipped_steps=log.skipped_steps, wall_s=wall_s, memory=memory,
                       time=time_stats([b - a for a, b in zip(stamps, stamps[1:])][1:]),  # the first: warm-up
                       env=environment(spec.device), settings=spec.settings.flat(), distributed=ranks_info,
                       **user, **(plan.fields() if plan is not None else {}))
    if not main:
        return SingleRun(None, result, main)
    path = result_path(out, spec, None if group is None else group.world)
    return SingleRun(write_json(path, result), result)


def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def side_measurements(exp: Experiment, snapshot: Path | None) -> dict[str, Any]:
    """The deterministic CPU memory figure of one meta-step (and the CUDA snapshot), on a copy of the
    learner and of the task stream, so the training run itself is unchanged."""
    learner = copy.deepcopy(exp.learner)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(exp.gen.get_state())

    def sample() -> list:
        return exp.sample(gen)

    state = torch.get_rng_state()
    step = StepRunner(learner, exp.sizes["outer_lr"], sample, scaler=exp.new_scaler(), check_finite=False)
    out: dict[str, Any] = measure_cpu_memory(step, sample())
    if snapshot is not None:
        out["snapshot"] = snapshot_meta_step(step, snapshot, exp.device)
    torch.set_rng_state(state)
    return out
