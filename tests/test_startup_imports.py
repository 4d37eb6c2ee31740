"""Claims (issue 24): ``run`` and a cell's child import none of the tables' and plots' libraries (pandas,
matplotlib, scipy); ``list`` and the bad-input exits are covered by ``tests/test_cli_core.py``.  Each command in
a fresh interpreter, as a user starts it; ``sys.modules`` is read after the command has done all its work.
Not timed tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from harness.bench.cells import Cell
from tests.conftest import FAST, REPO, TINY

HEAVY = ("pandas", "matplotlib", "scipy")
# main(argv) of a module, then the heavy modules it left in sys.modules, as the last line of stdout
AFTER = ("import sys\nfrom {module} import main\ncode = main({argv!r})\n"
         "print(code, [m for m in {heavy!r} if m in sys.modules])\n")


def _heavy_after(module: str, argv: list[str], cwd: Path) -> str:
    script = AFTER.format(module=module, argv=argv, heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_a_checkpointing_run_imports_no_table_or_plot_library(tmp_path: Path) -> None:
    argv = ["run", "--variant", "ckpt_lr", "--device", "cpu", "--meta-steps", "2", "--out", str(tmp_path)]
    assert _heavy_after("harness.cli.main", argv, tmp_path) == "0 []"
    assert list(tmp_path.glob("runs/*.json"))  # it ran to the end


def test_a_cells_child_imports_no_table_or_plot_library(tmp_path: Path) -> None:
    (tmp_path / "cell.json").write_text(json.dumps(asdict(Cell("ckpt_lr", "cpu-bench", settings=TINY))))
    (tmp_path / "opts.json").write_text(json.dumps(asdict(FAST)))
    argv = [str(tmp_path / "cell.json"), str(tmp_path / "opts.json"), str(tmp_path / "row.json")]
    assert _heavy_after("harness.bench.child", argv, tmp_path) == "0 []"
    assert json.loads((tmp_path / "row.json").read_text())["status"] == "ok"
