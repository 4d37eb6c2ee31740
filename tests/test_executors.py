"""Claims (issue 15): cells run as Ray tasks give the same rows as local cells; a Ray run interrupted part-way
resumes with only the missing cells and leaves no cell process behind; a cell whose Ray worker is killed is
``error`` with the reason while the others are ``ok``; a bad ``--address`` or a missing Ray is one line, exit 2,
nothing written; ablation cells trained as Ray tasks equal local ones.  One local 2-CPU Ray instance serves
the module."""
from __future__ import annotations

import builtins
import json
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness.bench.cells import Cell
from harness.bench.matrix import run_matrix
from harness.bench.process import LocalExecutor
from harness.reporting.files import read_cells
from harness.reporting.schema import CellRow
from harness.cli.main import main
from harness.studies.ablation.ablate import run_ablation
from harness.studies.ablation.spec import AblationSpec
from tests.conftest import FAST, TINY

ray = pytest.importorskip("ray", reason="the cluster extra (pip install '.[cluster]')")
psutil = pytest.importorskip("psutil")

from harness.bench.executors import RayExecutor  # noqa: E402 -- after the skip

VARIANTS = ("maml", "fo", "ckpt", "lr")  # second order, first order, checkpointed, learned LRs
CELLS = [Cell(v, "cpu-bench", settings=TINY) for v in VARIANTS]


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[RayExecutor]:
    with RayExecutor(cpus_per_cell=1, init_kwargs={"num_cpus": 2}) as executor:
        yield executor
    assert not ray.is_initialized()  # the executor stops the instance it started


def cell_processes() -> list[Any]:
    """Live cell processes (``python -m harness.bench.child``) of this module's tiny cells, started by Ray tasks."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if ("harness.bench.child" in cmd and p.status() != psutil.STATUS_ZOMBIE
                    and " ".join(p.parent().cmdline()).startswith("ray::")
                    and json.loads(Path(cmd[-3]).read_text())["settings"] == TINY):
                out.append(p)
        except (psutil.Error, OSError, ValueError, KeyError):
            continue
    return out


class Interrupted:
    """Ray, with Ctrl-C (a real SIGINT) arriving a moment after ``after`` cells have finished, while the driver
    waits for the others."""

    def __init__(self, inner: RayExecutor, after: int) -> None:
        self.inner, self.after, self.ran = inner, after, []

    def map(self, fn, items, *, failed, gpu=False):  # noqa: ANN001
        self.ran += [c.variant for c in items]
        for n, pair in enumerate(self.inner.map(fn, items, failed=failed, gpu=gpu), 1):
            if n == self.after:
                threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
            yield pair


def measured(row: CellRow) -> tuple:
    return row.variant, row.status, row.memory, row.agreement


@pytest.mark.slow  # minutes: `make test-slow` (CI runs it)
def test_ray_cells_match_local_cells_row_for_row_and_resume_after_an_interrupt(
        tmp_path: Path, ray_executor: RayExecutor, monkeypatch: pytest.MonkeyPatch) -> None:
    cancelled: list[bool] = []
    real_cancel = ray.cancel
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: (cancelled.append(kw.get("force")), real_cancel(ref, **kw)))
    first = Interrupted(ray_executor, after=2)
    endless = lambda c: replace(FAST, repeats=10**6) if c in CELLS[2:] else FAST  # noqa: E731 -- still running at ^C
    with pytest.raises(KeyboardInterrupt):
        run_matrix(CELLS, tmp_path / "ray", endless, progress=False, executor=first)
    done = read_cells(tmp_path / "ray")
    assert [r.variant for r in done] == list(VARIANTS[:2]) and all(r.status == "ok" for r in done)
    assert cancelled == [True, True]  # the two endless cells, forcibly
    deadline = time.monotonic() + 60  # cancelled: the endless cells' processes end with their workers
    while cell_processes() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert cell_processes() == []
    time.sleep(1.0)  # and none starts afterwards (a cancelled task that still ran would show here)
    assert cell_processes() == []

    again = Interrupted(ray_executor, after=99)
    ray_rows = run_matrix(CELLS, tmp_path / "ray", FAST, progress=False, executor=again)
    assert sorted(again.ran) == sorted(set(VARIANTS) - {r.variant for r in done})  # only the missing ones
    assert [r.wall_s for r in ray_rows if r.variant in {d.variant for d in done}] == \
        [r.wall_s for r in done]  # the finished rows are kept as they were

    local_rows = run_matrix(CELLS, tmp_path / "local", FAST, progress=False, executor=LocalExecutor())
    assert [r.variant for r in ray_rows] == list(VARIANTS)  # matrix order, whatever order they finished in
    assert [measured(r) for r in ray_rows] == [measured(r) for r in local_rows]
    assert all(r.memory["cpu_peak_alloc_mib"] > 0 for r in ray_rows)


def kill_worker_of(variant: str, killed: dict[str, int], stop: threading.Event) -> None:
    """SIGKILL the Ray worker whose cell process runs ``variant``, once it is running."""
    while not stop.is_set():
        for p in cell_processes():
            try:
                cell = json.loads(Path(p.cmdline()[-3]).read_text())
            except (OSError, ValueError, psutil.Error):
                continue
            if cell["variant"] == variant:
                killed.update(worker=p.ppid(), cell=p.pid)
                os.kill(p.ppid(), signal.SIGKILL)
                return
        time.sleep(0.1)


def test_a_cell_whose_worker_is_killed_is_an_error_and_the_others_are_ok(
        tmp_path: Path, ray_executor: RayExecutor) -> None:
    cells = [Cell(v, "cpu-bench", settings=TINY) for v in ("fo", "maml")]  # the killed one and one other
    slow = lambda c: replace(FAST, repeats=100_000) if c.variant == "maml" else FAST  # noqa: E731
    killed: dict[str, int] = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_worker_of, args=("maml", killed, stop), daemon=True)
    killer.start()
    try:
        rows = {r.variant: r for r in run_matrix(cells, tmp_path / "k", slow, progress=False,
                                                    executor=ray_executor)}
    finally:
        stop.set()
    assert killed, "the maml cell never started"
    assert rows["maml"].status == "error" and "Ray worker" in rows["maml"].message
    assert rows["fo"].status == "ok"
    assert len(read_cells(tmp_path / "k")) == 2
    for _ in range(40):  # the cell's process ends with its worker (harness.bench.process.die_with_parent)
        if not psutil.pid_exists(killed["cell"]) or psutil.Process(killed["cell"]).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"the killed worker's cell process {killed['cell']} is still running")


def bench(out: Path, *extra: str) -> list[str]:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return ["bench", "--device", "cpu", "--variants", "maml", *sets, "--repeats", "1", "--out", str(out),
            "--no-plots", *extra]


def test_an_unreachable_address_is_one_line_exit_2_nothing_written(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(bench(tmp_path / "out", "--executor", "ray", "--address", f"127.0.0.1:{port}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot reach a Ray cluster at --address 127.0.0.1:{port}" in err[0]
    assert not (tmp_path / "out").exists()


def test_without_ray_the_ray_executor_is_one_line_naming_the_extra(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(bench(tmp_path / "out", "--executor", "ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'cluster' extra" in err[0] and "maml-harness[cluster]" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a Ray instance plus two ablations, a minute or more: `make test-slow` (CI runs it)
def test_ablation_cells_trained_as_ray_tasks_equal_local_ones(tmp_path: Path, ray_executor: RayExecutor) -> None:
    spec = AblationSpec(preset="quick", variants=("maml",), meta_steps=3, seeds=2, eval_tasks=3,
                        eval_every=2, run_id="tiny", jobs=1)
    quiet = lambda s: None  # noqa: E731
    here = run_ablation(spec, tmp_path / "local", tmp_path / "p", progress=False, log=quiet)
    there = run_ablation(spec, tmp_path / "ray", tmp_path / "p", progress=False, log=quiet, executor=ray_executor)
    assert there["trained_cells"] == 2
    for a, b in zip(here["rows"], there["rows"]):
        assert a["status"] == b["status"] == "ok"
    curves = lambda d: {f.name: {k: v for k, v in json.loads(f.read_text()).items()  # noqa: E731
                                 if k in ("train_loss", "curve_test_loss", "test_loss", "status")}
                        for f in sorted((d / "tiny" / "cells").glob("*.json"))}
    assert curves(tmp_path / "ray") == curves(tmp_path / "local") != {}
