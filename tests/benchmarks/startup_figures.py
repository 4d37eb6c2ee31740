"""The harness's own cost (issue 24), measured: ``make overhead`` -> ``results/overhead-cpu/figures.{json,md}``.

Wall times (median of ``REPEATS`` fresh processes) of ``python -c "import torch"``, ``python -m harness list`` and
``python -m harness run --variant ckpt_lr --meta-steps 2``, and the per-cell overhead of a bench matrix (each
cell's process as the driver sees it minus the child's own ``wall_s``) with cells forked from the cell server and
started fresh (``HARNESS_CELL_START``).  The load average is recorded before and after; commit from a clean tree
(``git_dirty`` is recorded).  A benchmark, not a test: nothing is asserted.

    python tests/benchmarks/startup_figures.py [OUT_DIR]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REPEATS = 3
VARIANTS = "maml,fo,lr,lr_fo"
# run in a child interpreter: a matrix through a timing executor, one JSON line of (variant, process s, wall_s)
CELLS = """
import json, sys, time
from harness.bench.cells import Cell, MeasureOptions
from harness.bench.matrix import LOCAL, run_matrix
timed = []
class Timed:
    def measure(self, cell, opts):
        t = time.perf_counter(); row = LOCAL.measure(cell, opts)
        timed.append((cell.variant, time.perf_counter() - t, row.wall_s, row.status)); return row
run_matrix([Cell(v, "cpu-bench") for v in sys.argv[1].split(",")], sys.argv[2],
           MeasureOptions(warmup=0, repeats=1, pairs=1), force=True, progress=False, executor=Timed())
print(json.dumps(timed))
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _wall(cmd: list[str], cwd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _cells(mode: str, tmp: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CELLS, VARIANTS, str(Path(tmp) / mode)], cwd=tmp, check=True,
                         env=_env(HARNESS_CELL_START=mode), capture_output=True, text=True).stdout
    cells = json.loads(out.strip().splitlines()[-1])
    outside = [proc - wall for _, proc, wall, _ in cells]
    return {"cells": [{"variant": v, "process_s": p, "child_wall_s": w, "status": s} for v, p, w, s in cells],
            "outside_first_s": outside[0], "outside_rest_mean_s": statistics.mean(outside[1:])}


def main(out_dir: Path) -> None:
    py = sys.executable
    commands = {"import torch": [py, "-c", "import torch"], "harness list": [py, "-m", "harness", "list"],
                "harness run ckpt_lr": [py, "-m", "harness", "run", "--variant", "ckpt_lr", "--meta-steps", "2",
                                        "--device", "cpu"]}
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    figures: dict = {"git_commit": commit, "git_dirty": dirty, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        figures["wall_s"] = {name: statistics.median(_wall(cmd, tmp) for _ in range(REPEATS))
                             for name, cmd in commands.items()}
        figures["cell_overhead"] = {mode: _cells(mode, tmp) for mode in ("fresh", "fork")}
    figures["load_after"] = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    w, c = figures["wall_s"], figures["cell_overhead"]
    lines = [f"# Start-up and per-cell overhead (CPU), commit {commit[:10]}{' (dirty)' if dirty else ''}", "",
             f"load average before {figures['load_before'][0]:.2f}, after {figures['load_after'][0]:.2f}", "",
             "| what | wall s (median of 3) | minus import torch |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v - w['import torch']:.2f} |" for k, v in w.items()]
    lines += ["", f"| cells ({VARIANTS}) | first cell outside its measurement, s | later cells, mean s |", "|---|---|---|"]
    lines += [f"| {m} | {c[m]['outside_first_s']:.2f} | {c[m]['outside_rest_mean_s']:.2f} |" for m in c]
    (out_dir / "figures.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "results" / "overhead-cpu")
