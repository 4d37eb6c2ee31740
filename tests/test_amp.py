"""Claims about mixed precision: autocast is replayed by checkpoint recomputation, and the
fp16 GradScaler path skips overflowing meta-steps without touching weights or LRs."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from harness.loop.agreement import check_agreement

from harness.loop.spec import Experiment, RunSpec

from harness.loop.train import meta_step, train
from tests.conftest import cli, small_experiment
from tests.test_cli_core import harness


def _with_amp(exp: Experiment, amp: str) -> Experiment:
    exp.learner.cfg = replace(exp.learner.cfg, amp=amp)
    return exp


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["ckpt", "ckpt_lr", "ckpt_lr_fo", "ckpt_sckpt_lr", "bckpt_lr", "ckpt_bckpt_lr"])
def test_checkpointed_and_non_checkpointed_agree_under_each_precision(variant: str, amp: str) -> None:
    exp = _with_amp(small_experiment(variant, "cpu-bench", dtype="float32", inner_steps=2), amp)
    agree = check_agreement(exp, exp.sample())
    assert agree["w_rel_err"] <= 1e-6  # checkpointed vs non-checkpointed, same precision
    if exp.variant.learn_lr:
        assert agree["lr_rel_err"] <= 1e-6
    assert agree["fp32_w_cosine"] >= 0.99  # vs the fp32 non-checkpointed reference


def test_bf16_cell_trains_and_reports_fp32_agreement() -> None:
    spec = RunSpec(variant="ckpt_lr", preset="quick", device="cpu", amp="bf16", meta_steps=3)
    exp = Experiment(spec)
    assert check_agreement(exp, exp.sample())["fp32_w_cosine"] > 0.99
    log = train(exp, 3)
    assert len(log.losses) == 3 and log.skipped_steps == 0


def test_forced_overflow_skips_the_step_and_leaves_weights_and_lrs_bit_identical() -> None:
    exp = _with_amp(small_experiment("lr", "cpu-bench", dtype="float32", inner_steps=2), "fp16")
    opt = torch.optim.Adam(exp.learner.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # scaled losses overflow to inf
    before = {n: p.detach().clone() for n, p in exp.learner.named_parameters()}
    _, skipped = meta_step(exp.learner, opt, scaler, exp.sample())
    assert skipped
    for n, p in exp.learner.named_parameters():
        assert torch.equal(p, before[n]), n
    assert scaler.get_scale() < 2.0 ** 127  # backed off
    # and a sane scale then steps normally
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    _, skipped = meta_step(exp.learner, opt, scaler, exp.sample())
    assert not skipped
    assert not torch.equal(exp.learner.model.head.weight, before["model.head.weight"])


@pytest.mark.parametrize("args, needle", [
    (["--amp", "fp16", "--device", "cpu"], "valid choices on cpu: off, bf16"),
    (["--amp", "fp8", "--device", "cpu"], "unknown precision 'fp8' in --amp; valid choices on cpu: off, bf16"),
])
def test_bad_precision_is_a_one_line_error(tmp_path, args, needle, capsys) -> None:
    out = cli(capsys, "run", "--variant", "maml", *args, "--out", str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and needle in out.stderr
    assert not any(tmp_path.iterdir())


def test_the_bench_step_runner_skips_an_fp16_overflow_instead_of_calling_it_divergence() -> None:
    from harness.loop.train import StepRunner

    exp = _with_amp(small_experiment("lr", "cpu-bench", dtype="float32", inner_steps=2), "fp16")
    runner = StepRunner(exp.learner, 1e-2, exp.sample, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))
    runner(exp.sample())  # overflows: skipped, not diverged
    runner(exp.sample())
    assert runner.divergence.skipped_steps >= 1 and len(runner.losses) == 2
