"""Claims (issue 21): a user's own model and tasks run in the harness without a preset --
``--model``/``--tasks`` resolve from the current directory or a file, ``--set model.<kw>`` reaches the factory,
``--ckpt`` reaches ``MetaConfig.ckpt_modules``, the loss follows the documented rule, the specs are part of a
cell's identity and of its row, a cell's own process imports the user's module from where the command ran,
and ``check`` runs every registered variant on a model that calls ``torch.utils.checkpoint`` itself and says
which are exact (every one that runs), with finite differences for the second-order ones.

    python -m pytest tests/test_user_code.py
"""
from __future__ import annotations

import csv
import json
import re
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from harness.bench.cells import Cell, MeasureOptions
from harness.bench.check import AGREEMENT_TOL, FD_TOL, check_request, verdict
from harness.bench.child import measure_cell_inline
from harness.bench.matrix import run_matrix
from harness.bench.request import plan
from harness.cli import bench as bench_cmd
from harness.cli.main import build_parser, main
from harness.core.config import ConfigError
from harness.reporting.files import read_cells, read_row
from harness.reporting.schema import RunResult
from harness.studies.ablation.run import run_cell
from harness.studies.ablation.spec import AblationSpec, command_line
from harness.loop.spec import Experiment, RunSpec
from harness.variants import get_variant, registry
from harness.zoo import user
from harness.zoo.presets import get_preset
from tests.conftest import FAST, REPO, TINY, harness
from tests.test_cells import FakeExecutor

MODEL = "tests/user_models.py:make_stack"  # as a user types it, relative to where the command runs
TASKS = "tests/user_models.py:regression"
ABS_MODEL, ABS_TASKS = f"{REPO}/tests/user_models.py:make_stack", f"{REPO}/tests/user_models.py:regression"
SMALL = ["--inner-steps", "2", "--meta-batch", "2", "--device", "cpu"]


# -- resolving and building -------------------------------------------------------------------------------
def test_a_file_spec_is_relative_below_the_directory_else_absolute_and_a_module_spec_kept(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(REPO)
    assert user.normalize_spec(MODEL) == MODEL  # below the current directory: as committed rows can name it
    assert user.normalize_spec("./" + MODEL) == MODEL
    monkeypatch.chdir(tmp_path)
    assert user.normalize_spec(str(REPO / MODEL)) == ABS_MODEL
    assert user.normalize_spec("tests.user_models:make_stack") == "tests.user_models:make_stack"
    with pytest.raises(ConfigError, match="expected pkg.module:NAME or path/to/file.py:NAME"):
        user.normalize_spec("tests/user_models.py")


def test_set_model_keywords_reach_the_factory_and_ckpt_reaches_the_engine() -> None:
    spec = RunSpec("ckpt_lr", preset="quick", dtype="float64", meta_batch=2, model=ABS_MODEL, tasks=ABS_TASKS,
                   ckpt=["layers.*"])
    exp = Experiment(spec, model_overrides={"width": 5})
    assert exp.learner.model.head.in_features == 5
    assert exp.learner.cfg.ckpt_modules == ("layers.*",) and exp.learner.ckpt_modules == ["layers.0", "layers.1"]
    assert exp.sizes["inner_lr"] == get_preset("quick").inner_lr  # the preset still gives the sizes
    task, _ = exp.sample()
    assert task.support_x.dtype == torch.float64 and exp.learner.loss_fn is user.default_loss


def test_the_loss_rule_cross_entropy_for_integer_targets_mse_otherwise_and_a_loss_fn_attribute_wins() -> None:
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    assert torch.equal(user.default_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    pred, target = torch.randn(4, 1), torch.randn(4, 1)
    assert torch.equal(user.default_loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    with pytest.raises(ValueError, match=r"one shape, got \(4, 1\) and \(4,\)"):
        user.default_loss(pred, target[:, 0])  # mse_loss would broadcast it to 4 x 4 with only a warning
    assert user.UserTasks("tests.user_models:l1_regression").loss_fn is torch.nn.functional.l1_loss
    assert user.UserTasks("tests.user_models:regression").loss_fn is user.default_loss


def test_a_sampler_must_return_the_meta_batch_it_was_asked_for() -> None:
    with pytest.raises(user.UserCodeError, match=r"one_too_many\(2, gen\) returned 3 tasks; expected a meta-batch of 2"):
        user.UserTasks("tests.user_models:one_too_many").sample(2, torch.Generator())


def test_a_file_spec_imports_its_sibling_modules(tmp_path: Path) -> None:
    (tmp_path / "blocks_for_harness_test.py").write_text("from torch import nn\n\ndef block():\n"
                                                         "    return nn.Linear(1, 1)\n")
    (tmp_path / "model.py").write_text("from blocks_for_harness_test import block\n\ndef make():\n"
                                       "    return block()\n")
    assert isinstance(user.build_model(f"{tmp_path}/model.py:make"), torch.nn.Linear)


# -- identity, rows, resume ---------------------------------------------------------------------------------
def test_the_user_specs_are_part_of_a_cells_identity_and_a_presets_key_is_unchanged() -> None:
    preset = Cell("maml", "quick", settings={"width": 16})
    assert preset.key() == '["maml", "quick", "cpu", "float32", [["width", 16]], 0]'  # as before issue 21
    own = Cell("maml", "quick", settings={"width": 16}, model=ABS_MODEL)
    keys = {c.key() for c in (preset, own, Cell("maml", "quick", settings={"width": 16}, model=ABS_MODEL,
                                                 tasks=ABS_TASKS),
                              Cell("maml", "quick", settings={"width": 16}, model=ABS_MODEL, ckpt=("layers.*",)))}
    assert len(keys) == 4 and preset.compare_key() != own.compare_key()
    back = Cell(**json.loads(json.dumps(asdict(own))))  # as the cell's process reads it
    assert back == own and back.key() == own.key()
    spec = Cell("ckpt", "quick", model=ABS_MODEL, tasks=ABS_TASKS, ckpt=["layers.*"]).run_spec()
    assert (spec.model, spec.tasks, spec.ckpt) == (ABS_MODEL, ABS_TASKS, ("layers.*",))


def test_resume_never_takes_a_user_models_cell_for_the_presets(tmp_path: Path) -> None:
    fake = FakeExecutor()
    settings = dict(TINY)
    run_matrix(plan(["maml", "fo"], "cpu-bench", "cpu", "float32", 0, settings), tmp_path, FAST, executor=fake,
               progress=False, log=lambda s: None)
    own = plan(["maml", "fo"], "cpu-bench", "cpu", "float32", 0, settings, user=user.UserSpecs(model=ABS_MODEL))
    run_matrix(own, tmp_path, FAST, executor=fake, progress=False, log=lambda s: None)
    assert fake.ran == ["maml", "fo", "maml", "fo"]
    rows = read_cells(tmp_path)
    assert sorted((r.variant, r.model or "") for r in rows) == [("fo", ""), ("fo", ABS_MODEL), ("maml", ""),
                                                               ("maml", ABS_MODEL)]


def test_bench_plans_cells_with_the_recorded_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    args = build_parser().parse_args(["bench", "--preset", "quick", "--variants", "maml,ckpt", "--model", MODEL,
                                      "--tasks", TASKS, "--ckpt", "layers.*", "--ckpt", "layers.*", *SMALL,
                                      "--out", str(tmp_path)])
    req = bench_cmd.request_from_args(args)
    assert {(c.model, c.tasks, c.ckpt) for c in req.cells} == {(MODEL, TASKS, ("layers.*",))}
    assert req.run_dir.name == "quick-make_stack-regression-ckpt_layers__-cpu-inner_steps2-meta_batch2"
    assert not any(tmp_path.iterdir())


def test_run_with_a_user_model_tasks_and_ckpt_patterns_is_exact_and_records_them(tmp_path: Path, capsys,
                                                                                   monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    code = main(["run", "--variant", "ckpt_lr", "--model", MODEL, "--tasks", TASKS, "--ckpt", "layers.*",
                 "--dtype", "float64", "--meta-steps", "2", *SMALL, "--set", "model.width=4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (path,) = (tmp_path / "runs").iterdir()
    assert path.name.startswith("ckpt_lr_quick_make_stack-") and str(path) in out
    result = read_row(path, RunResult)
    assert result.status == "ok" and result.agreement["w_rel_err"] == 0 and result.agreement["lr_rel_err"] == 0
    assert (result.model, result.tasks, result.ckpt) == (MODEL, TASKS, ["layers.*"])
    assert result.spec["ckpt"] == ["layers.*"] and result.settings == {"inner_steps": 2, "meta_batch": 2,
                                                                             "model.width": 4}


def test_a_cell_reports_a_variant_refusing_the_model_as_unsupported_and_a_broken_sampler_as_error() -> None:
    small = {"inner_steps": 1, "meta_batch": 2}
    refused = measure_cell_inline(Cell("vmaml", "conv4", settings={**small, "model.channels": 4,
                                                                   "model.image_size": 8, "task.size": 8}), FAST)
    assert refused.status == "unsupported" and "BatchNorm2d" in refused.message
    broken = measure_cell_inline(Cell("maml", "quick", settings=small, model=ABS_MODEL,
                                      tasks="tests.user_models:raising_sampler"), FAST)
    assert broken.status == "error" and "the data folder is missing" in broken.message


def test_ablate_trains_a_user_model_and_fingerprints_it(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = AblationSpec(preset="quick", variants=("maml", "ckpt"), meta_steps=2, seeds=2, eval_tasks=2, eval_every=1,
                        jobs=1, model=ABS_MODEL, tasks=ABS_TASKS, ckpt=("layers.*",))
    assert spec.run_id == "ablation-quick-make_stack-regression-ckpt"
    assert spec.fingerprint()["model"] == ABS_MODEL and spec.fingerprint()["ckpt"] == ["layers.*"]
    assert f"--model {ABS_MODEL}" in command_line(spec) and "--ckpt 'layers.*'" in command_line(spec)
    cell = run_cell(spec, get_variant("ckpt"), 0)
    assert cell.status == "ok" and len(cell.train_loss) == 2 and cell.spec == spec.fingerprint()


# -- a cell's own process, from where the command ran -------------------------------------------------------
def test_a_bench_cell_imports_the_users_module_from_the_directory_the_command_ran_in(tmp_path: Path) -> None:
    """The canary: ``mymodel`` is importable only from ``tmp_path`` (the command's directory), the sampler is a
    relative file path; both must reach the cell's process, which runs elsewhere by default."""
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def make(width=4):
            return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))
    """))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sampler.py").write_text((REPO / "tests" / "user_models.py").read_text())
    r = harness("bench", "--preset", "quick", "--variants", "ckpt", "--model", "mymodel:make", "--tasks",
                "data/sampler.py:regression", "--ckpt", "0", *SMALL, "--dtype", "float64", "--warmup", "0",
                "--repeats", "1", "--pairs", "1", "--out", "results", "--run-id", "r", "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    (row,) = read_cells(tmp_path / "results" / "r")
    assert row.status == "ok", row.message
    assert row.model == "mymodel:make" and row.tasks == "data/sampler.py:regression"  # relative: the cell runs where the command ran
    assert row.agreement["w_rel_err"] == 0 and row.ckpt == ["0"]


# -- check -----------------------------------------------------------------------------------------------
def flat(**changes: object) -> dict:
    base = {"variant": "ckpt_lr", "status": "ok", "message": "", "dtype": "float64", "learn_lr": True,
            "first_order": False, "w_rel_err": 0.0, "lr_rel_err": 2e-16, "fd_rel_err": 3e-10, "mem_mib": 1.2,
            "mem_vs_maml": 0.61, "time_median_ms": 5.0, "time_vs_maml": 1.3, "time_vs_ref_paired": 1.6,
            "paired_ref": "lr"}
    return {**base, **changes}


def test_a_verdict_line_per_variant_a_user_can_act_on() -> None:
    exact = verdict(flat())
    assert exact.kind == "exact" and exact.passed
    assert exact.line == ("exact (weights 0, LRs 2e-16, finite differences 3e-10); peak 1.2 MiB = 0.61x maml, "
                          "time 1.30x maml (paired 1.60x lr)")
    wrong = verdict(flat(variant="ckpt", learn_lr=False, w_rel_err=3e-2, lr_rel_err=None))
    assert wrong.kind == "WRONG" and not wrong.passed
    assert wrong.line == ("WRONG: weights rel err 0.03 vs the non-checkpointed reference (tolerance 1e-10) -- "
                          "do not use")
    fd = verdict(flat(fd_rel_err=10 * FD_TOL))
    assert fd.kind == "WRONG" and "finite differences rel err 1e-05 vs the meta-gradient" in fd.line
    assert verdict(flat(lr_rel_err=float("nan"))).kind == "WRONG"
    assert verdict(flat(dtype="float32", w_rel_err=2e-7, fd_rel_err=None)).kind == "exact"
    assert AGREEMENT_TOL["float32"] > 2e-7 > AGREEMENT_TOL["float64"]
    refused = verdict(flat(variant="vmaml", status="unsupported", message="vectorize: module 'bn' ..."))
    assert refused.kind == "refused" and refused.passed and refused.line == "refused: vectorize: module 'bn' ..."
    failed = verdict(flat(status="oom", message="MemoryError: ..."))
    assert failed.kind == "FAILED" and failed.line == "FAILED (oom): MemoryError: ..." and not failed.passed


def test_check_plans_every_registered_variant_with_finite_differences_in_float64_only(tmp_path: Path) -> None:
    specs = user.UserSpecs(ABS_MODEL, ABS_TASKS)
    req = check_request(specs, "quick", "cpu", "float64", 0, {}, MeasureOptions(), tmp_path)
    assert [c.variant for c in req.cells] == list(registry()) and req.opts.fd_directions == 2
    assert all(c.model == ABS_MODEL and c.tasks == ABS_TASKS for c in req.cells)
    assert check_request(specs, "quick", "cpu", "float32", 0, {}, MeasureOptions(), tmp_path).opts.fd_directions == 0


LINE = re.compile(r"^  (\S+)\s+(exact|refused|WRONG|FAILED)\b(.*)$")


@pytest.mark.slow  # minutes: `make test-slow` (CI runs it)
def test_check_on_a_model_calling_torch_checkpoint_itself_every_variant_is_exact(tmp_path: Path) -> None:
    """The seed report's way of writing a model, every registered variant: all exact (the vectorized ones run
    the torch checkpoint as a plain call), finite differences within 1e-6 for second order (slow: 18 cells)."""
    out = tmp_path / "results"
    r = harness("check", "--model", MODEL, "--tasks", TASKS, "--ckpt", "layers.*", *SMALL, "--warmup", "0",
                "--repeats", "1", "--pairs", "1", "--out", str(out), "--run-id", "c")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {m[1]: (m[2], m[3]) for m in map(LINE.match, r.stdout.splitlines()) if m}
    assert list(lines) == list(registry())
    for name, (kind, rest) in lines.items():
        assert kind == "exact", (name, kind, rest)
        fd = re.search(r"finite differences ([0-9.e+-]+)", rest)
        assert (fd is None) == (get_variant(name).first_order or get_variant(name).estimator != "exact"), (name, rest)
        assert fd is None or float(fd[1]) <= FD_TOL
        assert name == "maml" or "x maml" in rest
    table = (out / "c" / "table.md").read_text()
    assert "| fd rel err |" in table.splitlines()[4] and f"model {MODEL}" in table
    summary = {row["variant"]: row for row in csv.DictReader((out / "c" / "summary.csv").open())}
    assert {v for v, row in summary.items() if row["fd_rel_err"]} == {
        v for v in registry() if not get_variant(v).first_order and get_variant(v).estimator == "exact"}
    assert {row["model"] for row in summary.values()} == {MODEL}
    assert len(list((out / "plots" / "c").glob("*.png"))) >= 1
