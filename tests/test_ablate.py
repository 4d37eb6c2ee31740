"""Claim: `harness ablate` writes ablation.csv / table.md / effects.csv and a learning-curve PNG,
resumes per (variant, seed) without retraining, checkpointed variants' curves are bit-identical
to their non-checkpointed counterparts (added automatically when not requested), and the
effects of order and LR learning come as paired differences with 95% CIs."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

import harness.studies.ablation.ablate as ablate
from harness.studies.ablation.ablate import AblationSpec, mean_ci, run_ablation, t_quantile
from harness.cli.main import main
from harness.core.config import ConfigError

TINY = ["--preset", "quick", "--meta-steps", "3", "--seeds", "2", "--eval-tasks", "3", "--eval-every", "2",
        "--no-progress"]


def spec(**kw) -> AblationSpec:
    base = dict(preset="quick", variants=("maml", "fo", "lr", "ckpt"), meta_steps=3, seeds=2, eval_tasks=3,
                eval_every=2, run_id="tiny")
    return AblationSpec(**{**base, **kw})


def quiet(s: str) -> None:
    pass


def test_cli_writes_table_csv_and_png(tmp_path: Path, capsys) -> None:
    code = main(["ablate", *TINY, "--variants", "maml,fo,lr,lr_fo,ckpt,ckpt_lr", "--run-id", "t",
                 "--results-dir", str(tmp_path / "results"), "--plots-dir", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    d = tmp_path / "results" / "t"
    rows = list(csv.DictReader((d / "ablation.csv").open()))
    assert [r["variant"] for r in rows] == ["maml", "fo", "lr", "lr_fo", "ckpt", "ckpt_lr"]
    for r in rows:
        lo, m, hi = (float(r[k]) for k in ("test_loss_ci_low", "test_loss_mean", "test_loss_ci_high"))
        assert lo <= m <= hi
    effects = list(csv.DictReader((d / "effects.csv").open()))
    assert {(e["a"], e["b"]) for e in effects} >= {("maml", "fo"), ("lr", "lr_fo"), ("lr", "maml"), ("ckpt_lr", "ckpt")}
    table = (d / "table.md").read_text()
    assert "95% CI" in table and "bit-identical" in table and "python -m harness ablate --preset quick" in table
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


@pytest.mark.parametrize("variants", [("ckpt_lr", "ckpt_fo"), ("sckpt_lr", "ckpt_sckpt_lr_fo")])
def test_checkpointed_curves_identical_and_counterparts_added(tmp_path: Path, variants) -> None:
    s = spec(variants=variants, meta_steps=4, eval_every=1)
    summary = run_ablation(s, tmp_path / "r", tmp_path / "p", progress=False, log=quiet)
    roles = {r["variant"]: r["role"] for r in summary["rows"]}
    expected = {"ckpt_lr": "lr", "ckpt_fo": "fo", "sckpt_lr": "lr", "ckpt_sckpt_lr_fo": "lr_fo"}
    for v in variants:
        assert roles[v] == "requested" and roles[expected[v]] == "counterpart"
    assert summary["checks"] and summary["all_identical"]
    assert all(c["max_abs_diff"] == 0.0 for c in summary["checks"])
    for v in variants:  # the curves really are long and equal, not vacuously empty
        a, b = summary["curves"][v], summary["curves"][expected[v]]
        assert len(a["train_loss"][0]) == 4 and len(a["test_loss"][0]) == 5
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]


def test_statistics() -> None:
    assert t_quantile(1) == pytest.approx(12.706, abs=2e-3)
    assert t_quantile(10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci_high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert math.isnan(mean_ci([1.0])["ci_low"])


def test_effects_are_paired_differences(tmp_path: Path) -> None:
    summary = run_ablation(spec(variants=("maml", "fo", "lr")), tmp_path / "r", tmp_path / "p",
                           progress=False, log=quiet)
    rows = {r["variant"]: r for r in summary["rows"]}
    by = {(e["a"], e["b"]): e for e in summary["effects"]}
    order = by[("maml", "fo")]
    assert order["mean_diff"] == pytest.approx(rows["maml"]["test_loss_mean"] - rows["fo"]["test_loss_mean"])
    assert order["ci_low"] <= order["mean_diff"] <= order["ci_high"] and order["n_pairs"] == 6
    assert ("lr", "maml") in by and by[("lr", "maml")]["verdict"]


@pytest.mark.parametrize("argv, words", [
    (["--variants", "maml,nope"], "unknown variant"),
    (["--seeds", "0"], "--seeds"),
    (["--data-root", "/tmp"], "--data-root"),
    (["--run-id", "../x"], "--run-id"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path: Path, capsys, argv, words) -> None:
    code = main(["ablate", *TINY, *argv, "--results-dir", str(tmp_path / "r"), "--plots-dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err
    assert not (tmp_path / "r").exists()


def test_ways_and_shots_reach_task_and_model(tmp_path: Path, capsys) -> None:
    from harness.cli.main import build_parser
    from harness.cli.ablate import canonical_command, spec_from_args

    args = build_parser().parse_args(["ablate", "--preset", "conv4", "--ways", "3", "--shots", "2"])
    s = spec_from_args(args)
    assert s.task_overrides == {"n_way": 3, "k_shot": 2} and s.model_overrides == {"n_way": 3}
    assert "--ways 3 --shots 2" in canonical_command(s, args)
    assert main(["ablate", *TINY, "--ways", "3", "--results-dir", str(tmp_path / "r")]) == 2
    assert "--ways" in capsys.readouterr().err
