"""Claims about `python -m harness list` and `run`, including every bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.variants import CANONICAL
from tests.conftest import REPO, cli, harness


def test_list_shows_the_eight_variants_with_their_flags(capsys: pytest.CaptureFixture) -> None:
    """In this process: ``list`` in a fresh interpreter is the lazy-import test's first command (below)."""
    out = cli(capsys, "list")
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    for name in CANONICAL:
        assert name in lines
    assert lines["ckpt_lr"].split()[1:4] == ["yes", "yes", "second"]
    assert lines["fo"].split()[1:4] == ["-", "-", "first"]


def test_run_quick_writes_a_result_with_agreement_and_provenance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """In this process: ``run``'s fresh-process canary is tests/test_startup_imports.py's checkpointing run."""
    out = cli(capsys, "run", "--variant", "ckpt_lr", "--preset", "quick", "--device", "cpu",
              "--meta-steps", "3", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    files = list((tmp_path / "runs").glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["status"] == "ok"
    assert result["agreement"]["w_rel_err"] <= 1e-6 and result["agreement"]["lr_rel_err"] <= 1e-6
    assert len(result["query_loss"]) == 3
    for key in ("python", "torch", "cuda", "gpu", "driver", "git_commit", "git_dirty", "utc"):
        assert key in result["env"]
    assert "ckpt_lr on quick" in out.stdout


@pytest.mark.parametrize("args, needle", [
    (["run", "--variant", "nope"], "valid variants: maml, fo, lr"),
    (["run", "--variant", "maml", "--preset", "nope"], "valid presets: quick"),
    (["run", "--variant", "maml", "--inner-steps", "-1"], "--inner-steps must be in 0..1000"),
    (["run", "--variant", "maml", "--meta-batch", "0"], "--meta-batch must be in 1..1024"),
    (["run", "--variant", "maml", "--dtype", "float16"], "valid dtypes: float32, float64"),
    (["run", "--variant", "maml", "--device", "tpu"], "valid devices: cpu, cuda"),
    (["run", "--variant", "maml", "--inner-steps", "x"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: list[str], needle: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    """In this process; the unknown command (the top-level parser's) in a fresh one, through ``python -m
    harness``.  ``run``'s fresh-process canary is tests/test_startup_imports.py's checkpointing run."""
    argv = [*args, "--out", str(tmp_path)] if args[0] == "run" else args
    fresh = args == ["frobnicate"]
    out = harness(*argv) if fresh else cli(capsys, *argv)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())


def test_cuda_without_cuda_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = cli(capsys, "run", "--variant", "maml", "--device", "cuda", "--out", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "CUDA is not available" in out.stderr
    assert not any(tmp_path.iterdir())


def test_zero_shots_and_more_ways_than_classes_are_rejected() -> None:
    from harness.core.config import ConfigError
    from harness.zoo.tasks import Sinusoid, SyntheticImages

    with pytest.raises(ConfigError, match="more ways than"):
        SyntheticImages(n_way=10, num_classes=5)
    with pytest.raises(ConfigError, match="must be >= 1"):
        SyntheticImages(k_shot=0)
    with pytest.raises(ConfigError, match="shots and query must be >= 1"):
        Sinusoid(shots=0)


def test_a_diverging_run_is_recorded_as_diverged(tmp_path: Path) -> None:
    from unittest import mock

    from harness.cli.main import main

    with mock.patch("harness.core.engine.MetaLearner.step", return_value=float("nan")):
        assert main(["run", "--variant", "maml", "--device", "cpu", "--meta-steps", "3", "--out", str(tmp_path)]) == 1
    result = json.loads(next(tmp_path.glob("runs/*.json")).read_text())
    assert result["status"] == "diverged" and "nan" in result["message"]


LIGHT_COMMANDS = [["list"], ["run", "--variant", "nosuch"], ["run", "--preset", "nosuch"],
                  ["run", "--variant", "maml", "--set", "width=abc"], ["nosuch"], []]


def test_list_and_a_bad_run_load_neither_pandas_nor_matplotlib_nor_scipy_stats() -> None:
    """Lazy command registration (``cli/main.py``): ``list`` and ``run``'s bad-input exits import only their own
    command's module, so none of the tables' and plots' libraries.  One fresh interpreter runs each in turn."""
    script = ("import contextlib, io, sys\nfrom harness.cli.main import main\nheavy = ('pandas', 'matplotlib', 'scipy.stats')\n"
              f"for argv in {LIGHT_COMMANDS!r}:\n"
              "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
              "        code = main(argv)\n"
              "    print(argv, code, [m for m in heavy if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(LIGHT_COMMANDS), r.stdout
    assert lines[0] == "['list'] 0 []" and all(line.endswith(" 2 []") for line in lines[1:]), r.stdout
