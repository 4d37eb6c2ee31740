"""Claims: the estimator variants (trunc, lr_trunc, ckpt_trunc, sckpt_trunc, imaml, ckpt_imaml, reptile) are
registered, listed, run through ``python -m harness run`` and a bench cell with their fidelity to the exact
meta-gradient recorded (and implicit's CG residual); the exact variants record none; their settings travel as
``--set`` keys; what does not compose is refused in one line, exit 2, nothing written; no peer claims them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.bench.cells import Cell
from harness.bench.child import measure_cell_inline
from harness.peers.support import NO_ESTIMATOR, PEERS, supports
from harness.reporting.frame import flatten
from harness.reporting.verdicts import verdict
from harness.settings import split_settings, variant_with
from harness.variants import get_variant, registry
from tests.conftest import FAST, TINY, cli

ESTIMATOR_VARIANTS = {"trunc": "truncated", "lr_trunc": "truncated", "ckpt_trunc": "truncated",
                      "sckpt_trunc": "truncated", "imaml": "implicit", "ckpt_imaml": "implicit", "reptile": "reptile"}


def _run(capsys, tmp_path: Path, variant: str, *extra: str):
    ran = cli(capsys, "run", "--variant", variant, "--preset", "quick", "--device", "cpu", "--meta-steps", "2",
              "--out", str(tmp_path), *extra)
    files = list((tmp_path / "runs").glob("*.json"))
    return ran, (json.loads(files[0].read_text()) if files else None)


def test_list_shows_each_estimator_variant_with_its_estimator(capsys) -> None:
    ran = cli(capsys, "list")
    assert ran.returncode == 0
    lines = {line.split()[0]: line.split() for line in ran.stdout.splitlines() if line.strip()}
    for name, estimator in ESTIMATOR_VARIANTS.items():
        assert registry()[name].estimator == estimator
        assert lines[name][3] == estimator
    assert lines["maml"][3] == "second" and lines["fo"][3] == "first"


@pytest.mark.parametrize("variant", list(ESTIMATOR_VARIANTS))
def test_each_estimator_variant_runs_and_records_its_fidelity(capsys, tmp_path: Path, variant: str) -> None:
    ran, result = _run(capsys, tmp_path, variant)
    assert ran.returncode == 0, ran.stderr
    assert result["status"] == "ok" and result["agreement"]["w_rel_err"] <= 1e-6
    fidelity = result["fidelity"]
    assert -1 <= fidelity["w_cosine"] <= 1 and fidelity["w_rel_err"] > 0  # K = 2, T = 1: not the exact one
    assert ("cg_residual" in fidelity) == (ESTIMATOR_VARIANTS[variant] == "implicit")
    assert (fidelity["lr_cosine"] is not None) == registry()[variant].learn_lr
    assert result["variant"]["estimator"] == ESTIMATOR_VARIANTS[variant]
    assert "fidelity vs the exact meta-gradient" in ran.stdout


def test_truncated_through_every_step_is_exact_in_the_run_and_exact_variants_record_no_fidelity(
        capsys, tmp_path: Path) -> None:
    ran, result = _run(capsys, tmp_path / "t", "trunc", "--set", "truncate_steps=2")
    assert ran.returncode == 0, ran.stderr
    assert result["fidelity"]["w_rel_err"] == 0 and result["settings"] == {"truncate_steps": 2}
    ran, result = _run(capsys, tmp_path / "m", "maml")
    assert ran.returncode == 0 and "fidelity" not in result and "fidelity" not in ran.stdout
    ran, result = _run(capsys, tmp_path / "f", "fo")
    assert ran.returncode == 0 and result["fidelity"]["w_cosine"] < 1 and "estimator" not in result["variant"]


def test_a_bench_cell_of_an_estimator_records_fidelity_and_skips_finite_differences() -> None:
    row = measure_cell_inline(Cell("imaml", "cpu-bench", settings={**TINY, "cg_steps": 3}), FAST)
    assert row.status == "ok", row.message
    assert set(row.fidelity) == {"w_rel_err", "w_cosine", "lr_rel_err", "lr_cosine", "cg_residual"}
    assert row.flags["cg_steps"] == 3 and row.fidelity["cg_residual"] >= 0
    exact = measure_cell_inline(Cell("maml", "cpu-bench", settings=TINY), FAST)
    assert exact.status == "ok" and exact.fidelity is None and "fidelity" not in exact.to_dict()
    lines = {f["variant"]: verdict(f).line for f in flatten([row, exact])}  # `check`'s one line per variant
    assert "implicit: no finite differences; vs the exact meta-gradient cosine" in lines["imaml"]
    assert "CG residual" in lines["imaml"] and "vs the exact" not in lines["maml"]


@pytest.mark.parametrize("args,words", [
    (["--variant", "imaml", "--set", "step_ckpt=1"], "no step to checkpoint"),
    (["--variant", "reptile", "--set", "memory_budget=1GiB"], "valid: no memory_budget"),
    (["--variant", "imaml", "--set", "truncate_steps=2"], "truncate_steps is a setting of the truncated estimator"),
    (["--variant", "maml", "--set", "cg_steps=3"], "cg_steps is a setting of the implicit estimator"),
    (["--variant", "imaml", "--set", "implicit_lambda=-1"], "implicit_lambda must be a positive number"),
    (["--variant", "trunc", "--set", "vectorize=1"], "vectorize=0"),
    (["--variant", "reptile", "--set", "amp=bf16"], "amp='off'")])
def test_what_does_not_compose_is_refused_in_one_line_and_nothing_is_written(capsys, tmp_path: Path, args: list,
                                                                          words: str) -> None:
    ran = cli(capsys, "run", *args, "--preset", "quick", "--device", "cpu", "--out", str(tmp_path))
    assert ran.returncode == 2 and words in ran.stderr, ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1 and "Traceback" not in ran.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_the_estimator_settings_travel_as_set_keys_into_the_variant_and_its_flags() -> None:
    parts = split_settings({"implicit_lambda": "0.5", "cg_steps": 7})
    imaml = variant_with(get_variant("imaml"), parts.variant)
    assert (imaml.implicit_lambda, imaml.cg_steps) == (0.5, 7)
    assert imaml.flags["implicit_lambda"] == 0.5 and imaml.config(inner_steps=2).cg_steps == 7
    trunc = variant_with(get_variant("trunc"), split_settings({"truncate_steps": 4}).variant)
    assert trunc.config(inner_steps=8).truncate_steps == 4
    assert set(get_variant("maml").flags) == set(get_variant("fo").flags)  # exact variants' flags as before
    assert "estimator" not in get_variant("maml").flags


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("variant", ["trunc", "imaml", "reptile"])
def test_no_peer_claims_an_estimator(peer: str, variant: str) -> None:
    assert supports(peer, get_variant(variant)) == (False, NO_ESTIMATOR)


def test_ablate_tests_each_estimator_against_exact_with_holm(capsys, tmp_path: Path) -> None:
    ran = cli(capsys, "ablate", "--preset", "quick", "--variants", "maml,trunc,imaml", "--meta-steps", "2",
              "--seeds", "2", "--eval-tasks", "2", "--eval-every", "2", "--jobs", "1", "--out", str(tmp_path),
              "--no-progress")
    assert ran.returncode == 0, ran.stderr
    table = (tmp_path / "ablation-quick" / "table.md").read_text()
    assert "| trunc | truncated |" in table and "| imaml | implicit |" in table
    assert "| exact - truncated | maml - trunc |" in table and "| exact - implicit | maml - imaml |" in table
    assert "Holm correction over the 2 effects" in table
