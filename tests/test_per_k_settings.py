"""Per-K settings (issue 22, the long-horizon sweep): ``--set step_ckpt=sqrt`` (segments of ceil(sqrt K)) and
``--set snapshots=log2`` (binomial with ceil(log2 K) stored states), kept as the word in the cell's settings and
resolved for the cell's K where the config is built, so one ``sweep --param inner_steps=...`` covers every K.

    python -m pytest -q tests/test_per_k_settings.py
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from tests.conftest import cli
from harness.bench.cells import Cell
from harness.settings import parse_param, parse_settings, split_settings

STEPS = (1, 2, 8, 32, 128, 512, 1024)


def _config(settings: dict, steps: int):  # noqa: ANN202 -- a MetaConfig
    cell = Cell("lr", "cpu-bench", settings={**settings, "inner_steps": steps})
    return Cell(**json.loads(json.dumps(asdict(cell)))).run_spec().variant_obj.config(inner_steps=steps)


def test_step_ckpt_sqrt_is_segments_of_ceil_sqrt_k() -> None:
    settings = parse_settings(["step_ckpt=sqrt", "step_rebuild=step"], "cpu-bench")
    assert settings == {"step_ckpt": "sqrt", "step_rebuild": "step"}  # the word is what rows and labels show
    assert [_config(settings, k).step_ckpt for k in STEPS] == [1, 2, 3, 6, 12, 23, 32]
    assert split_settings(settings).variant == settings


def test_snapshots_log2_is_ceil_log2_k_stored_states() -> None:
    settings = parse_settings(["snapshots=log2"], "cpu-bench")
    assert [_config(settings, k).snapshots for k in STEPS] == [1, 1, 3, 5, 7, 9, 10]


def test_a_per_k_word_sweeps_with_inner_steps() -> None:
    assert parse_param("step_ckpt=1,sqrt", "cpu-bench") == ("step_ckpt", [1, "sqrt"])


@pytest.mark.parametrize("item", ["step_ckpt=log2", "snapshots=sqrt", "step_ckpt=sqr", "width=sqrt"])
def test_a_wrong_word_is_exit_2_naming_the_choices(capsys, tmp_path, item: str) -> None:
    ran = cli(capsys, "bench", "--variants", "lr", "--preset", "cpu-bench", "--device", "cpu", "--set", item,
              "--run-id", "t", "--out", str(tmp_path))
    assert ran.returncode == 2
    [line] = ran.stderr.strip().splitlines()
    key = item.split("=")[0]
    assert key in line and ("(per K)" in line) == (key != "width")
    assert not list(tmp_path.iterdir())
