"""Shared fixtures: small float64 cells built from the shipped presets, on the CPU."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from harness.bench.cells import MeasureOptions
from harness.cli.main import main
from harness.loop.spec import Experiment, RunSpec


def small_experiment(variant: str, preset: str = "quick", dtype: str = "float64", inner_steps: int | None = None,
                     seed: int = 0, **model_overrides) -> Experiment:
    task_overrides = {}
    if preset == "conv4":
        model_overrides = {"channels": 8, "image_size": 16, **model_overrides}
        task_overrides = {"size": 16, "query": 2}
    if preset == "cpu-bench":
        model_overrides = {"width": 16, "depth": 2, **model_overrides}
        task_overrides = {"sequences": 2, "tokens": 4}
    spec = RunSpec(variant=variant, preset=preset, device="cpu", dtype=dtype, inner_steps=inner_steps,
                   meta_batch=2, seed=seed)
    return Experiment(spec, task_overrides=task_overrides, model_overrides=model_overrides)


REPO = Path(__file__).resolve().parent.parent
TINY = {"width": 16, "depth": 2, "task.sequences": 2, "task.tokens": 4}  # a tiny cpu-bench cell
FAST = MeasureOptions(warmup=0, repeats=1, timeout_s=120, nvml=False, threads=1, pairs=3)


def harness(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m harness ARGS`` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


class Ran(NamedTuple):
    """What ``cli`` returns, shaped like a ``CompletedProcess``: exit code, stdout, stderr."""
    returncode: int
    stdout: str
    stderr: str


def cli(capsys: pytest.CaptureFixture, *args: str) -> Ran:
    """``python -m harness ARGS`` in this process (``harness.cli.main.main``), for bad-input checks: the same
    one-line errors and exit codes without a fresh interpreter.  Each command keeps one ``harness(...)`` canary
    that runs it in a fresh process, as a user would."""
    capsys.readouterr()  # what the test printed before
    code = main(list(args))
    out, err = capsys.readouterr()
    return Ran(code, out, err)


# The test models are tiny: one intra-op thread is several times faster than two on a 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    gc.collect()  # the earlier tests' garbage first (cheap: the frozen objects are not walked), never frozen
    gc.freeze()  # what earlier tests imported lazily (torch's functorch, dispatch tables): see below
    yield


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported and collected so far (torch, every test module) lives for the whole session: out of the
    collector's sight (``gc.freeze``; again before each test, for what torch imports lazily), so that each
    ``gc.collect()`` of a memory measurement (``harness.bench.measure``) does not walk it again: 0.2-0.4 s a call
    in a collected suite, more than half of a planner test.  The figures are unchanged: the tracker counts only
    the storages a meta-step allocates."""
    gc.freeze()
