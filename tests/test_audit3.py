"""Issue 25 (third audit), cases 5, 7, 8, 9, 13, 14, 15, 16, 19, 20: every file the harness writes stays inside
the run's own folders and is never written through a symlink it did not create; the project's variants come
from the installed package, never from the current directory; every option, environment variable and
claim/lock file is checked by the one rule (one line, exit 2, nothing written).

    python -m pytest tests/test_audit3.py
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from harness.bench.executors import check_cpus_per_cell
from harness.bench.measure import LiveBytesTracker
from harness.core.config import ConfigError
from harness.loop import distributed
from harness.settings import CPU_MEM_CAP_ENV, DIST_TIMEOUT_ENV
from tests.test_bad_input import BASE, no_work, refused  # noqa: F401 -- no_work is a fixture

__all__ = ["no_work"]


def test_a_run_id_longer_than_a_file_name_is_refused_before_results_is_made(no_work: Path, capsys) -> None:  # 16
    refused([*BASE["bench"], "--run-id", "r" * 300], capsys, no_work, "--run-id must be a folder name of at most 255")
    refused([*BASE["sweep"], "--run-id", "é" * 128], capsys, no_work, "got 256 bytes")  # bytes, not characters


@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate"])
def test_one_key_set_twice_to_two_values_is_refused(no_work: Path, capsys, command: str) -> None:  # 20
    refused([*BASE[command], "--set", "inner_steps=2", "--set", "inner_steps=3"], capsys, no_work,
            "--set inner_steps=3 contradicts --set inner_steps=2")


ENV_CASES = [(name, text) for name in (CPU_MEM_CAP_ENV, DIST_TIMEOUT_ENV) for text in ("abc", "-5", "nan", "1e400")]


@pytest.mark.parametrize("name, text", ENV_CASES)
@pytest.mark.parametrize("command", ["run", "bench"])
def test_a_numeric_environment_variable_that_is_not_a_positive_number_is_refused(
        no_work: Path, capsys, monkeypatch, command: str, name: str, text: str) -> None:  # 15
    monkeypatch.setenv(name, text)
    refused(BASE[command], capsys, no_work, f"environment variable {name}={text!r} must be a positive finite number")


@pytest.mark.parametrize("name, text", ENV_CASES)
def test_where_the_variables_are_read_they_are_checked_by_the_same_rule(monkeypatch, name: str, text: str) -> None:
    """A cell's process and every torchrun rank read them too: a ConfigError (one line), not a traceback."""
    monkeypatch.setenv(name, text)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    read = LiveBytesTracker if name == CPU_MEM_CAP_ENV else lambda: distributed.session("cpu").__enter__()
    with pytest.raises(ConfigError, match=f"{name}={text!r} must be a positive finite number"):
        read()


def test_the_numeric_environment_variables_still_work(monkeypatch) -> None:
    monkeypatch.setenv(CPU_MEM_CAP_ENV, "0.5")
    assert LiveBytesTracker().cap_bytes == 512 * 1024
    monkeypatch.setenv(CPU_MEM_CAP_ENV, "")
    assert LiveBytesTracker().cap_bytes is None


@pytest.mark.parametrize("cpus, got", [("nan", "nan"), ("inf", "inf"), ("0", "0.0"), ("-1", "-1.0"),
                                       ("1000000", "1000000.0")])
@pytest.mark.parametrize("command", ["bench", "sweep", "ablate"])
def test_cpus_per_cell_is_checked_before_the_run_folder_is_made_or_ray_starts(
        no_work: Path, capsys, monkeypatch, command: str, cpus: str, got: str) -> None:  # 14
    monkeypatch.setattr("harness.bench.executors.RayExecutor.__init__", no_ray_start)
    refused([*BASE[command], "--executor", "ray", "--cpus-per-cell", cpus], capsys, no_work,
            f"--cpus-per-cell must be a number in (0, {os.cpu_count()}] (this machine's CPUs), got {got}")


def no_ray_start(*a: object, **k: object) -> None:
    raise AssertionError("Ray was started before --cpus-per-cell was checked")


def test_a_joined_cluster_may_have_more_cpus_than_this_machine() -> None:
    assert check_cpus_per_cell(1e6, "auto") == 1e6
    with pytest.raises(ConfigError, match=r"--cpus-per-cell must be a finite number > 0, got nan"):
        check_cpus_per_cell(math.nan, "auto")
