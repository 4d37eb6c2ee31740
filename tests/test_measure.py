"""Claims: the CPU memory figure is deterministic, sees frees, and shows per-layer
checkpointing lowering memory; timing statistics and the CUDA/NVML paths degrade cleanly."""
from __future__ import annotations

import pytest
import torch

from harness.bench.measure import LiveBytesTracker, measure, measure_cpu_memory, noise_warning, snapshot_meta_step, time_stats

from harness.loop.train import StepRunner
from harness.bench.nvml import NvmlSampler
from harness.core.config import ConfigError
from harness.loop.spec import Experiment, RunSpec
from tests.conftest import small_experiment

MODEL = {"width": 16, "depth": 2}


def tiny(variant: str, inner_steps: int | None = None, seed: int = 0) -> Experiment:
    """cpu-bench shrunk, with enough tokens that activations (not weights) dominate memory."""
    spec = RunSpec(variant=variant, preset="cpu-bench", inner_steps=inner_steps, meta_batch=1, seed=seed)
    return Experiment(spec, model_overrides=MODEL, task_overrides={"sequences": 2, "tokens": 16})


def cpu_figure(variant: str, inner_steps: int | None = None, seed: int = 0) -> float:
    exp = tiny(variant, inner_steps, seed)
    step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample)
    step(exp.sample())  # warm-up: Adam state exists before the measured step, as in `measure`
    return measure_cpu_memory(step, exp.sample())["cpu_peak_alloc_mib"]


def test_tracker_counts_storages_once_and_sees_frees() -> None:
    with LiveBytesTracker() as tr:
        a = torch.ones(1024)  # 4 KiB
        v = a.view(32, 32)  # a view: same storage, not counted again
        b = a * 2
        assert tr.live == 2 * 4096
        del b
        assert tr.live == 4096
    assert tr.peak == 2 * 4096 and v.numel() == 1024


def test_tracker_cap_raises_memory_error() -> None:
    with pytest.raises(MemoryError, match="cap"):
        with LiveBytesTracker(cap_bytes=1000):
            torch.ones(1024)


def test_cpu_figure_is_identical_across_runs() -> None:
    assert cpu_figure("ckpt_lr") == cpu_figure("ckpt_lr")


@pytest.mark.parametrize("plain,ckpt", [("fo", "ckpt_fo"), ("lr_fo", "ckpt_lr_fo"), ("lr", "sckpt_lr")])
def test_checkpointing_lowers_the_cpu_figure(plain: str, ckpt: str) -> None:
    assert cpu_figure(ckpt) < cpu_figure(plain)


def test_step_checkpointing_order_at_more_inner_steps() -> None:
    figs = {v: cpu_figure(v, inner_steps=3) for v in ("lr", "ckpt_lr", "sckpt_lr", "ckpt_sckpt_lr")}
    # layer checkpoints inside step checkpoints change the peak by < 1% either way (measured)
    assert figs["lr"] > figs["ckpt_lr"] > figs["sckpt_lr"] and figs["ckpt_sckpt_lr"] <= 1.01 * figs["sckpt_lr"], figs
    assert figs["sckpt_lr"] < 0.9 * figs["ckpt_lr"], figs


def test_time_stats_and_noise_warning() -> None:
    s = time_stats([0.010, 0.011, 0.012, 0.013, 0.030])
    assert s["count"] == 5 and s["min_ms"] == pytest.approx(10) and s["median_ms"] == pytest.approx(12)
    assert s["iqr_ms"] == pytest.approx(2) and s["noisy"] and "noisy" in noise_warning(s, "x")
    quiet = time_stats([0.010, 0.010, 0.0101])
    assert not quiet["noisy"] and noise_warning(quiet, "x") is None
    assert time_stats([])["count"] == 0


def test_measure_on_cpu_reports_memory_and_time() -> None:
    exp = tiny("ckpt_lr_fo")
    step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample)
    out = measure(step, "cpu", warmup=1, repeats=3)
    assert out["cpu_peak_alloc_mib"] > 0 and out["time"]["count"] == 3
    assert "cuda_peak_alloc_mib" not in out and len(step.losses) == 5


def test_nvml_sampler_degrades_without_a_gpu() -> None:
    with NvmlSampler() as s:
        pass
    if not torch.cuda.is_available():
        assert not s.available and s.peak_bytes == 0  # no GPU: nothing sampled, said so
    with pytest.raises(ValueError):
        NvmlSampler(interval_s=0.01)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error path")
def test_memory_snapshot_needs_cuda(tmp_path) -> None:
    exp = small_experiment("maml", "quick", dtype="float32")
    with pytest.raises(ConfigError, match="needs CUDA"):
        snapshot_meta_step(StepRunner(exp.learner, 1e-3, exp.sample), tmp_path / "s.pickle", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_figures_and_snapshot(tmp_path) -> None:
    from harness.loop.spec import Experiment, RunSpec

    exp = Experiment(RunSpec(variant="ckpt_fo", preset="quick", device="cuda"))
    step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample)
    out = measure(step, "cuda", warmup=1, repeats=3)
    assert out["cuda_peak_alloc_mib"] >= out["cuda_peak_alloc_above_base_mib"] > 0
    assert out["time"]["count"] == 3
    path = snapshot_meta_step(step, tmp_path / "snap.pickle", "cuda")
    assert (tmp_path / "snap.pickle").stat().st_size > 0 and path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finite_differences_on_cuda_equal_the_cpus_and_leave_the_cuda_generator_as_found() -> None:
    """The H200 session's bug: ``check``'s directions were drawn on the CPU and never moved to the GPU, so every
    second-order cell on CUDA failed; and only the CPU's generator was restored afterwards."""
    from harness.gradcheck import finite_difference_error
    from harness.loop.spec import Experiment, RunSpec

    errs = {}
    for device in ("cpu", "cuda"):
        exp = Experiment(RunSpec(variant="lr", preset="quick", device=device, dtype="float64"))
        tasks = exp.sample(torch.Generator().manual_seed(3))
        state = torch.cuda.get_rng_state()
        errs[device] = finite_difference_error(exp.learner, tasks)
        assert torch.equal(torch.cuda.get_rng_state(), state)
    assert errs["cuda"] <= 1e-6 and abs(errs["cuda"] - errs["cpu"]) <= 1e-6, errs


def test_tracker_cap_from_the_environment_and_tensors_without_bytes(monkeypatch) -> None:
    """The test hook MAML_HARNESS_CPU_MEM_CAP_MIB caps the tracker; empty and sparse tensors count nothing."""
    from harness.bench.measure import CAP_ENV

    with LiveBytesTracker() as tr:
        torch.empty(0) + 1  # no bytes
        torch.ones(3).to_sparse() * 2  # a sparse result has no untyped storage of its own
    assert tr.live == 0 and tr.peak_mib == tr.peak / 2 ** 20
    monkeypatch.setenv(CAP_ENV, "0.001")
    with pytest.raises(MemoryError, match=CAP_ENV):
        with LiveBytesTracker():
            torch.ones(1024)
