"""One way through a run (issue 26): a ``RunSpec`` carries its settings, split by destination and typed, from
where they are parsed (``run``'s command line, a bench ``Cell``) to where the learner is built, so the cell
process builds from the spec alone and ``run`` and ``bench`` build the same thing from the same settings.

    python -m pytest tests/test_run_spec.py
"""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from harness.bench.cells import Cell
from harness.core.config import ConfigError
from harness.loop.spec import Experiment, RunSpec
from harness.settings import CellSettings, split_settings

SETTINGS = {"inner_steps": 3, "width": 8, "depth": 1, "task.tokens": 4, "task.sequences": 1, "step_ckpt": 1,
            "step_rebuild": "step"}


def test_a_cell_becomes_one_spec_with_its_settings_split_by_destination():
    spec = Cell("sckpt_lr", "cpu-bench", dtype="float64", settings=SETTINGS, seed=3).run_spec()
    assert (spec.variant, spec.preset, spec.dtype, spec.seed, spec.inner_steps) == ("sckpt_lr", "cpu-bench",
                                                                                     "float64", 3, 3)
    assert spec.settings == CellSettings({"inner_steps": 3}, {"width": 8, "depth": 1}, {"tokens": 4, "sequences": 1},
                                         {"step_ckpt": 1, "step_rebuild": "step"}, {})
    # back to --set keys (model keywords as model.<kw>) for rows and rank hashes; split again, the same parts
    assert spec.settings.flat() == {**{k: v for k, v in SETTINGS.items() if k not in ("width", "depth")},
                                    "model.width": 8, "model.depth": 1}
    assert split_settings(spec.settings.flat()) == spec.settings


def test_the_learner_is_built_from_the_spec_alone():
    exp = Experiment(Cell("sckpt_lr", "cpu-bench", settings=SETTINGS).run_spec())
    model = exp.learner.model
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in Experiment(RunSpec(
        "sckpt_lr", "cpu-bench", settings={"width": 8, "depth": 1})).learner.model.parameters())
    assert exp.variant.step_ckpt == 1 and exp.variant.step_rebuild == "step" and exp.learner.cfg.step_ckpt == 1
    assert exp.learner.cfg.inner_steps == 3
    task = exp.sample()[0]
    assert tuple(task.support_x.shape[:2]) == (1, 4)  # task.sequences=1, task.tokens=4 reached the sampler


def test_run_and_a_bench_cell_build_equal_specs_from_the_same_settings():
    from_run = RunSpec("sckpt_lr", "cpu-bench", inner_steps=3, settings=split_settings(SETTINGS))
    from_dict = RunSpec("sckpt_lr", "cpu-bench", inner_steps=3, settings=SETTINGS)  # a dict is split on the way in
    from_cell = Cell("sckpt_lr", "cpu-bench", settings=SETTINGS).run_spec()
    assert from_run == from_dict == from_cell and from_run.variant_obj == from_cell.variant_obj


def test_the_spec_fields_stored_in_rows_leave_the_settings_out():
    spec = RunSpec("maml", "quick", settings={"width": 8})
    fields = spec.fields()
    assert "settings" not in fields and fields == {k: v for k, v in asdict(spec).items() if k != "settings"}
    json.dumps(fields)  # what a row stores


def test_a_bad_setting_in_a_cell_is_refused_where_the_spec_is_made():
    with pytest.raises(ConfigError, match="unknown cell setting 'bogus'"):
        Cell("maml", "quick", settings={"bogus": 1}).run_spec()
