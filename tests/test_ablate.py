"""Claim: `harness ablate` writes ablation.csv / effects.csv / checks.csv / table.md and a learning-curve PNG,
resumes per (variant, seed) without retraining, trains base variants on every seed and checkpointed ones
only on the verified seeds, where their curves are bit-identical to their non-checkpointed counterparts
(added automatically when not requested), makes no equality claim for diverged cells, and takes its
defaults from one place."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import harness.studies.ablation.ablate as ablate
import harness.loop.train
from harness.cli.ablate import spec_from_args
from harness.studies.ablation.spec import command_line
from harness.cli.main import build_parser, main
from harness.core.config import ConfigError
from harness.reporting.files import read_row, write_json
from harness.reporting.schema import AblationCell, AblationSummary
from harness.studies.ablation.ablate import run_ablation
from harness.studies.ablation.spec import AblationSpec
from harness.variants import get_variant

TINY = ["--preset", "quick", "--meta-steps", "3", "--seeds", "2", "--eval-tasks", "3", "--eval-every", "2",
        "--no-progress", "--jobs", "1"]


def spec(**kw) -> AblationSpec:
    base = dict(preset="quick", variants=("maml", "fo", "lr", "ckpt"), meta_steps=3, seeds=2, eval_tasks=3,
                eval_every=2, run_id="tiny", jobs=1)
    return AblationSpec(**{**base, **kw})


def quiet(s: str) -> None:
    pass


def test_cli_writes_tables_csvs_and_png(tmp_path: Path, capsys) -> None:
    code = main(["ablate", *TINY, "--variants", "maml,fo,lr,lr_fo,ckpt,ckpt_lr", "--run-id", "t",
                 "--results-dir", str(tmp_path / "results"), "--plots-dir", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    d = tmp_path / "results" / "t"
    rows = list(csv.DictReader((d / "ablation.csv").open()))
    assert [r["variant"] for r in rows] == ["maml", "fo", "lr", "lr_fo", "ckpt", "ckpt_lr"]
    for r in rows[:4]:
        lo, m, hi = (float(r[k]) for k in ("test_loss_t_low", "test_loss_mean", "test_loss_t_high"))
        assert lo <= m <= hi and r["seeds"] == "2"
    effects = list(csv.DictReader((d / "effects.csv").open()))
    assert {(e["a"], e["b"]) for e in effects} == {("maml", "fo"), ("lr", "lr_fo"), ("lr", "maml"), ("lr_fo", "fo")}
    assert all(e["seeds"] == "2" and e["p_holm"] for e in effects)
    checks = list(csv.DictReader((d / "checks.csv").open()))
    assert {(c["variant"], c["counterpart"], c["identical"]) for c in checks} == {("ckpt", "maml", "True"),
                                                                                   ("ckpt_lr", "lr", "True")}
    table = (d / "table.md").read_text()
    assert "Holm" in table and "bit-identical" in table and "python -m harness ablate --preset quick" in table
    png = tmp_path / "plots" / "t" / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((d / "cells").glob("*.json"))) == 12
    assert "second - first order" in out and "bit-identical" in out


def test_resume_skips_finished_cells_and_force_retrains(tmp_path: Path, monkeypatch) -> None:
    s = spec(variants=("maml", "ckpt"))
    first = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    assert first["trained_cells"] == 4
    cell = tmp_path / "r" / "tiny" / "cells" / "maml_s0.json"
    before = cell.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a finished cell was retrained")

    monkeypatch.setattr(ablate, "run_cell", no_training)
    again = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    assert again["trained_cells"] == 0 and again["reused_cells"] == 4
    assert cell.stat().st_mtime_ns == before
    assert [r["test_loss_mean"] for r in again["rows"]] == [r["test_loss_mean"] for r in first["rows"]]
    monkeypatch.undo()
    cell.unlink()  # an interrupted run: only the missing cell is trained
    partial = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    assert partial["trained_cells"] == 1
    forced = run_ablation(s, tmp_path / "r", tmp_path / "p", force=True, progress=False, log=quiet)
    assert forced["trained_cells"] == 4
    with pytest.raises(ConfigError, match="--force"):  # stored cells of another configuration are not mixed in
        run_ablation(spec(variants=("maml", "ckpt"), meta_steps=4), tmp_path / "r", tmp_path / "p",
                     progress=False, log=quiet)


def test_cells_and_summary_are_rows_and_an_unreadable_cell_is_recomputed(tmp_path: Path) -> None:
    s = spec(variants=("maml",))
    first = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    d = tmp_path / "r" / "tiny"
    cells = [read_row(d / "cells" / f"maml_s{seed}.json", AblationCell) for seed in (0, 1)]
    assert [(c.variant["name"], c.seed, c.status, c.spec) for c in cells] == [("maml", 0, "ok", s.fingerprint()),
                                                                                ("maml", 1, "ok", s.fingerprint())]
    assert len(cells[0].train_loss) == 3 and cells[0].curve_steps == [0, 2, 3]
    summary = read_row(d / "summary.json", AblationSummary)
    assert summary.curves is None and summary.rows == first["rows"] and summary.trained_cells == 2
    text = (d / "cells" / "maml_s0.json").read_text()
    (d / "cells" / "maml_s0.json").write_text(text[: len(text) // 2])  # truncated
    old = json.loads((d / "cells" / "maml_s1.json").read_text())
    write_json(d / "cells" / "maml_s1.json", {**old, "schema": 2})  # written before the one SCHEMA_VERSION
    again = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    assert again["trained_cells"] == 2 and again["rows"][0]["test_loss_mean"] == first["rows"][0]["test_loss_mean"]
    write_json(d / "cells" / "maml_s1.json", {**old, "test_loss": "low"})  # malformed
    assert run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)["trained_cells"] == 1


def test_a_cell_its_executor_lost_is_an_error_row(tmp_path: Path) -> None:
    lost = ablate._lost_cell(spec(), (get_variant("fo"), 1), "the Ray worker running the cell died")
    back = read_row(write_json(ablate.cell_path(tmp_path, "fo", 1), lost), AblationCell)
    assert (back.status, back.variant["name"], back.seed, back.test_loss) == ("error", "fo", 1, [])
    assert back.message == "the Ray worker running the cell died" and back.spec == spec().fingerprint()


@pytest.mark.parametrize("variants", [("ckpt_lr", "ckpt_fo"), ("sckpt_lr", "ckpt_sckpt_lr_fo")])
def test_checkpointed_curves_identical_and_counterparts_added(tmp_path: Path, variants) -> None:
    s = spec(variants=variants, meta_steps=4, eval_every=1)
    summary = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    roles = {r["variant"]: r["role"] for r in summary["rows"]}
    expected = {"ckpt_lr": "lr", "ckpt_fo": "fo", "sckpt_lr": "lr", "ckpt_sckpt_lr_fo": "lr_fo"}
    for v in variants:
        assert roles[v] == "requested" and roles[expected[v]] == "counterpart"
    assert summary["checks"] and summary["all_identical"]
    assert all(c["max_abs_diff"] == 0.0 and c["identical"] is True for c in summary["checks"])
    for v in variants:  # the curves really are long and equal, not vacuously empty
        a, b = summary["curves"][v], summary["curves"][expected[v]]
        assert len(a["train_loss"][0]) == 4 and len(a["test_loss"][0]) == 5
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]


def test_cells_from_worker_processes_equal_sequential_ones(tmp_path: Path) -> None:
    one = run_ablation(spec(variants=("maml", "ckpt")), tmp_path / "a", tmp_path / "p", progress=False, log=quiet)
    two = run_ablation(spec(variants=("maml", "ckpt"), jobs=2), tmp_path / "b", tmp_path / "p", progress=False,
                       log=quiet)
    assert two["config"]["jobs"] == 2 and two["trained_cells"] == 4
    assert two["curves"] == one["curves"] and two["checks"] == one["checks"]
    assert two["rows"][0]["test_loss_mean"] == one["rows"][0]["test_loss_mean"]


def test_checkpointed_variants_train_only_on_the_verified_seeds(tmp_path: Path) -> None:
    s = spec(variants=("maml", "ckpt"), seeds=3, verify_seeds=1)
    summary = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    cells = sorted(p.name for p in (tmp_path / "r" / "tiny" / "cells").glob("*.json"))
    assert cells == ["ckpt_s0.json", "maml_s0.json", "maml_s1.json", "maml_s2.json"]
    (check,) = summary["checks"]
    assert (check["seeds_checked"], check["seeds_total"], check["identical"]) == (1, 3, True)
    assert "1 of 3" in (tmp_path / "r" / "tiny" / "table.md").read_text()


def test_a_checkpointed_variant_that_differs_is_reported(tmp_path: Path, monkeypatch) -> None:
    real = ablate.run_cell

    def perturbed(spec, variant, seed, on_step=None):
        cell = real(spec, variant, seed, on_step)
        if variant.checkpointed:  # what a broken checkpoint would do
            cell.test_loss = [x + 1e-6 for x in cell.test_loss]
        return cell

    monkeypatch.setattr(ablate, "run_cell", perturbed)
    summary = run_ablation(spec(variants=("maml", "ckpt")), tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    (check,) = summary["checks"]
    assert check["identical"] is False and check["max_abs_diff"] == pytest.approx(1e-6, rel=1e-3)
    assert not summary["all_identical"]


def test_diverged_cells_get_no_equality_claim(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 13: with diverged cells `ablate` printed "all checkpointed curves bit-identical"."""
    real = harness.loop.train.meta_step

    def nan_after_one(learner, opt, scaler, tasks):
        first = not opt.state  # Adam has no state before its first step
        loss, skipped = real(learner, opt, scaler, tasks)
        return (loss if first else math.nan), skipped  # the second step of every cell diverges

    monkeypatch.setattr(harness.loop.train, "meta_step", nan_after_one)
    code = main(["ablate", *TINY, "--variants", "maml,fo,ckpt", "--results-dir", str(tmp_path / "r"),
                 "--plots-dir", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 1
    table = (tmp_path / "r" / "ablation-quick" / "table.md").read_text()
    (check,) = list(csv.DictReader((tmp_path / "r" / "ablation-quick" / "checks.csv").open()))
    assert check["identical"] == "" and check["diverged_seeds"] == "[0, 1]"
    for text in (out, table):
        assert "no claim for ckpt (diverged)" in text and "0 of 1 checkpointed" in text
        assert "= maml, bit-identical" not in text and "| bit-identical |" not in text
    assert "not tested: a seed diverged" in table


def test_defaults_live_in_one_place() -> None:
    args = build_parser().parse_args(["ablate", "--preset", "sinusoid"])
    from_cli = spec_from_args(args)
    assert from_cli == AblationSpec(preset="sinusoid")
    assert from_cli.seeds >= 10 and from_cli.verify_seeds >= 2 and from_cli.run_id == "ablation-sinusoid"
    assert "--seeds 10 --verify-seeds 2" in command_line(from_cli, args.set)
    assert AblationSpec(preset="quick", seeds=2).verify_seeds == 2  # never more than the seeds


@pytest.mark.parametrize("argv, words", [
    (["--variants", "maml,nope"], "unknown variant"),
    (["--seeds", "1"], "--seeds must be in 2.."),
    (["--verify-seeds", "0"], "--verify-seeds"),
    (["--jobs", "0"], "--jobs"),
    (["--eval-tasks", "1000000000000"], "--eval-tasks"),
    (["--data-root", "/tmp"], "--data-root"),
    (["--run-id", "../x"], "--run-id"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path: Path, capsys, argv, words) -> None:
    code = main(["ablate", *TINY, *argv, "--results-dir", str(tmp_path / "r"), "--plots-dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err
    assert not (tmp_path / "r").exists()


def test_ways_and_shots_reach_task_and_model(tmp_path: Path, capsys) -> None:
    args = build_parser().parse_args(["ablate", "--preset", "conv4", "--ways", "3", "--shots", "2"])
    s = spec_from_args(args)
    assert s.task_overrides == {"n_way": 3, "k_shot": 2} and s.model_overrides == {"n_way": 3}
    assert "--ways 3 --shots 2" in command_line(s, args.set)
    assert main(["ablate", *TINY, "--ways", "3", "--results-dir", str(tmp_path / "r")]) == 2
    assert "--ways" in capsys.readouterr().err
