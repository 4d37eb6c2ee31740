"""Claim: ``python -m harness diagnose`` reproduces the seed report's failures with the stateful engine
(the categories the team measured), the functional engine is ok everywhere, the probes behind the
explanation hold, and the command writes its two files / rejects bad input with one line."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from harness.cli.main import main
from harness.reporting.schema import DiagnosisResult
from harness.studies.seed.diagnose import (AMP_TOL, ENGINES, INPLACE, Setup, check_expectations, explanation,
                                           run_probes, run_table)
from harness.studies.seed.engine import SeedConfig, SeedLearner
from harness.zoo.tasks import mse
from harness.studies.seed.table import flags
from harness.variants import CANONICAL, registry


@pytest.fixture(scope="module")
def table() -> dict:
    return run_table(Setup(), torch.device("cpu"))


def test_table_covers_eight_variants_three_engines(table: dict) -> None:
    assert list(table) == list(CANONICAL)
    assert all(list(row) == list(ENGINES) for row in table.values())


def test_functional_engine_ok_everywhere(table: dict) -> None:
    for variant, row in table.items():
        cell = row["functional"]
        assert cell["status"] == "ok", (variant, cell)
        assert cell["w_rel_err"] <= 1e-12 and (cell["lr_rel_err"] is None or cell["lr_rel_err"] <= 1e-12)


@pytest.mark.parametrize("engine", ["seed_reentrant", "seed_non_reentrant"])
@pytest.mark.parametrize("variant", ["lr_fo", "ckpt_lr_fo"])
def test_learnable_lr_first_order_raises_inplace_error(table: dict, engine: str, variant: str) -> None:
    cell = table[variant][engine]
    assert cell["status"] == "raises" and cell["exception"] == "RuntimeError" and INPLACE in cell["message"]


def test_reentrant_ckpt_lr_raises_in_both_orders(table: dict) -> None:
    for variant in ("ckpt_lr", "ckpt_lr_fo"):
        cell = table[variant]["seed_reentrant"]
        assert cell["status"] == "raises" and INPLACE in cell["message"]


def test_reentrant_ckpt_second_order_loses_second_order_terms(table: dict) -> None:
    cell = table["ckpt"]["seed_reentrant"]
    assert cell["status"] == "wrong" and cell["w_rel_err"] > 0.05


def test_learnable_lr_second_order_without_ckpt_has_wrong_lr_gradient(table: dict) -> None:
    for engine in ("seed_reentrant", "seed_non_reentrant"):
        cell = table["lr"][engine]
        assert cell["status"] == "wrong" and cell["w_rel_err"] <= 1e-12 and cell["lr_rel_err"] > 0.05


def test_non_reentrant_ckpt_second_order_is_silently_wrong(table: dict) -> None:
    for variant in ("ckpt", "ckpt_lr"):
        cell = table[variant]["seed_non_reentrant"]
        assert cell["status"] == "wrong" and cell["w_rel_err"] > 0.01


def test_seed_without_checkpointing_or_learnable_lr_is_correct(table: dict) -> None:
    for variant in ("maml", "fo", "ckpt_fo"):
        for engine in ("seed_reentrant", "seed_non_reentrant"):
            assert table[variant][engine]["status"] == "ok", (variant, engine)


def test_table_matches_the_teams_expectations(table: dict) -> None:
    assert check_expectations(table) == []


def test_every_probe_behind_the_explanation_holds() -> None:
    probes = run_probes(Setup(), torch.device("cpu"))
    assert {n: p.get("holds") for n, p in probes.items()} == {n: True for n in probes}
    inplace = probes["inplace"]
    assert inplace["ckpt_lr_reentrant_1_step"]["error_in"] == "outer backward"
    assert inplace["ckpt_reentrant_fixed_lr"]["grad_accumulated_in_place"]  # bumped, but nothing saved it


def test_cli_writes_both_files(tmp_path, capsys) -> None:
    assert main(["diagnose", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reproduces the team's table" in out and "version" in out
    data = json.loads((tmp_path / "diagnosis.json").read_text())
    assert data["kind"] == "diagnosis" and data["env"]["torch"] == torch.__version__
    assert set(data["table"]) == set(CANONICAL)
    md = (tmp_path / "diagnosis.md").read_text()
    assert "| `ckpt_lr` |" in md and "functional engine" in md


@pytest.mark.parametrize("argv", [["diagnose", "--device", "tpu"], ["diagnose", "--amp", "fp8"],
                                  ["diagnose", "--bogus"]])
def test_bad_input_exits_2_with_one_line(argv, tmp_path, capsys) -> None:
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path, capsys) -> None:
    assert main(["diagnose", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1


# -- mixed precision: the report's GradScaler path (fp16) and bf16 autocast, on CPU -------------------------------

@pytest.fixture(scope="module", params=["bf16", "fp16"])
def amp_table(request) -> tuple[str, dict]:
    return request.param, run_table(Setup(amp=request.param), torch.device("cpu"))


def test_amp_reproduces_the_float64_failure_categories(amp_table) -> None:
    amp, table = amp_table
    assert check_expectations(table) == [], amp  # same ok / raises (in-place error) / wrong cells as float64
    assert table["ckpt_lr"]["seed_reentrant"]["status"] == "raises"
    assert "FloatTensor" in table["ckpt_lr"]["seed_reentrant"]["message"]  # float32 weights, not float64
    assert table["ckpt_lr"]["seed_non_reentrant"]["status"] == "wrong"
    assert table["ckpt"]["seed_reentrant"]["w_rel_err"] > 100 * AMP_TOL[amp]  # far outside the tolerance


def test_amp_functional_engine_ok_and_close_to_float64(amp_table) -> None:
    amp, table = amp_table
    for variant, row in table.items():
        cell = row["functional"]
        assert cell["status"] == "ok", (amp, variant, cell)
        # the precision's own error against float64: non-zero (autocast really applied) but small
        assert 0 < cell["f64_w_rel_err"] < 0.05, (amp, variant, cell)


def test_amp_seed_correct_cells_agree_with_same_precision_reference(amp_table) -> None:
    amp, table = amp_table
    for variant in ("maml", "fo", "ckpt_fo"):
        for engine in ("seed_reentrant", "seed_non_reentrant"):
            cell = table[variant][engine]
            assert cell["status"] == "ok" and cell["w_rel_err"] <= AMP_TOL[amp], (amp, variant, engine, cell)


def test_fp16_uses_a_finite_gradscaler_scale(amp_table) -> None:
    amp, table = amp_table
    if amp != "fp16":
        pytest.skip("GradScaler is fp16 only")
    scales = {c["loss_scale"] for row in table.values() for c in row.values()}
    assert all(s <= 2.0 ** 16 and math.log2(s).is_integer() for s in scales)


def test_seed_fp16_takes_the_gradscaler_path(monkeypatch) -> None:
    calls: list[str] = []
    real_scale, real_unscale = torch.amp.GradScaler.scale, torch.amp.GradScaler.unscale_
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, x: calls.append("scale") or real_scale(self, x))
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_",
                        lambda self, opt: calls.append("unscale_") or real_unscale(self, opt))
    setup = Setup(amp="fp16", meta_batch=1)
    cfg = SeedConfig(inner_steps=2, inner_lr=setup.inner_lr, amp="fp16", init_scale=2.0 ** 10)
    grads, _ = SeedLearner(setup.model(torch.device("cpu")), cfg, mse).meta_gradients(setup.tasks(torch.device("cpu")))
    assert calls == ["scale", "scale", "scale", "unscale_"]  # 2 inner losses, the outer loss, then unscale_
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_cli_amp_writes_its_own_files(tmp_path, capsys) -> None:
    assert main(["diagnose", "--device", "cpu", "--amp", "fp16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reproduces the team's table" in out and "GradScaler" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnosis-fp16.json", "diagnosis-fp16.md"]
    data = json.loads((tmp_path / "diagnosis-fp16.json").read_text())
    assert data["amp"] == "fp16" and data["dtype"] == "float32" and data["probes"] == {}
    assert "--amp fp16" in data["command"]
    assert "| `ckpt_lr` |" in (tmp_path / "diagnosis-fp16.md").read_text()


def test_bad_amp_lists_valid_choices(tmp_path, capsys) -> None:
    assert main(["diagnose", "--amp", "fp8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "valid choices on cpu: off, bf16, fp16" in err  # CPU GradScaler: fp16 too
    with pytest.raises(ValueError, match="valid choices"):
        Setup(amp="fp8")


def test_the_explanation_states_the_run_s_own_figures_and_none_it_did_not_measure() -> None:
    cell = lambda w, lr=None: {"status": "ok" if w <= 1e-12 else "wrong", "w_rel_err": w, "lr_rel_err": lr}  # noqa: E731
    table = {v: {"functional": cell(3e-17), "seed_reentrant": cell(0.25)} for v in CANONICAL}
    table["lr"]["functional"] = cell(0.5, 0.7)  # one broken functional cell: the text must say 7 of 8
    probes = {"inplace": {"ckpt_reentrant_fixed_lr": {"grad_accumulated_in_place": ["blocks.0.weight"]},
                          "ckpt_lr_reentrant": {"error_in": "inner step 2 backward",
                                                "anomaly_forward_lines": ["update = lr * param.grad"]},
                          "ckpt_lr_reentrant_1_step": {"error_in": "outer backward"},
                          "lr_1_step": {"grad_accumulated_in_place": ["head.bias"]}},
              "hook_routes": {"block_leaf_hooks_fired_inside_checkpoint_backward": True},
              "lr_pollution": {"lr_rel_err": 0.31, "lr_rel_err_after_adding_inner_loss_grads": 4.4e-17}}
    result = DiagnosisResult(setup={"inner_steps": 2}, tolerance=1e-12, table=table, probes=probes)
    text = explanation(result)
    for figure in ("modified in place: blocks.0.weight", "surfaced in: inner step 2 backward",
                   "1 inner step: outer backward", "1 inner step: head.bias", "blames: `update = lr * param.grad`", "backward: True", "w rel err 0.25",
                   "LR rel err 0.31", "d raw: 4.4e-17", "ok in 7 of 8 cells, largest rel err 0.7"):
        assert figure in text, figure
    assert "1e-16" not in text and "all eight" not in text
    bare = explanation(replace(result, probes={}))  # mixed precision: no probes
    assert bare.count("not measured in this run") == 8


def test_the_seed_engine_s_switches_come_from_the_registry_not_the_name() -> None:
    # `sckpt_lr` checkpoints inner-step segments, not layers: a name parser would read `ckpt` in it
    assert flags("sckpt_lr") == {"layer_ckpt": False, "learn_lr": True, "first_order": False}
    for name, variant in registry().items():
        assert flags(name) == {k: variant.flags[k] for k in ("layer_ckpt", "learn_lr", "first_order")}
