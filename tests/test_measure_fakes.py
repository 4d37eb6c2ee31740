"""Claims: the code no GPU here has ever run -- the CUDA allocator peaks, CUDA-event timing, the NVML sampler,
the memory snapshot, the GradScaler path of a meta-step -- computes what it says from what CUDA and NVML
report.  CUDA and NVML are fakes here (monkeypatched ``torch.cuda`` functions, a fake ``pynvml`` module);
docs/measurement.md says what a fake cannot stand in for."""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from harness.bench import measure as M
from harness.bench.measure import MIB, measure, snapshot_meta_step
from harness.loop.train import StepRunner
from harness.bench.nvml import NvmlSampler
from harness.loop.spec import Experiment, RunSpec


class NVMLError(Exception):
    pass


class FakeNvml:
    """pynvml's surface the sampler uses; ``procs`` is what the driver lists, ``fail`` makes calls raise."""

    NVMLError = NVMLError

    def __init__(self, used_by_us: int = 3 << 20, device_used: int = 50 << 20) -> None:
        self.procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=used_by_us)]
        self.device_used, self.fail, self.calls = device_used, set(), []

    def _call(self, name: str, value):
        self.calls.append(name)
        if name in self.fail:
            raise NVMLError(name)
        return value

    def nvmlInit(self): return self._call("init", None)
    def nvmlShutdown(self): return self._call("shutdown", None)
    def nvmlDeviceGetHandleByUUID(self, uuid): return self._call("uuid", ("uuid", uuid))
    def nvmlDeviceGetHandleByIndex(self, i): return self._call("index", ("index", i))
    def nvmlDeviceGetComputeRunningProcesses(self, h): return self._call("procs", self.procs)
    def nvmlDeviceGetMemoryInfo(self, h): return self._call("meminfo", SimpleNamespace(used=self.device_used))


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.t - self.t) * 1e3


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A CUDA whose allocator had 10 MiB allocated / 20 reserved before the steps, and peaks of 30 / 45."""
    state = {"reset": 0, "synced": 0, "history": []}
    figures = {"memory_allocated": 10, "memory_reserved": 20, "max_memory_allocated": 30, "max_memory_reserved": 45}
    for name, mib in figures.items():
        monkeypatch.setattr(torch.cuda, name, lambda dev=None, mib=mib: int(mib * MIB))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: state.__setitem__("reset", 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: state.__setitem__("synced", state["synced"] + 1))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="1234-abcd"))
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda **kw: state["history"].append(kw.get("enabled", "on")))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: open(path, "wb").write(b"snapshot"))
    return state


def runner(scaler=None, variant: str = "ckpt_fo") -> StepRunner:
    spec = RunSpec(variant=variant, preset="cpu-bench", meta_batch=1)
    exp = Experiment(spec, model_overrides={"width": 8, "depth": 1}, task_overrides={"sequences": 1, "tokens": 4})
    return StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample, scaler=scaler)


def test_cuda_figures_are_the_allocator_peaks_above_the_pre_step_base(cuda: dict, nvml: FakeNvml) -> None:
    out = measure(runner(), "cuda", warmup=1, repeats=3)
    assert cuda["reset"] and cuda["synced"] >= 2
    assert out["cuda_peak_alloc_mib"] == 30 and out["cuda_peak_alloc_above_base_mib"] == 20
    assert out["cuda_peak_reserved_mib"] == 45 and out["cuda_peak_reserved_above_base_mib"] == 25
    assert out["time"]["count"] == 3 and out["time"]["median_ms"] > 0  # from the events' elapsed times
    assert out["nvml_peak_mib"] == 3 and out["nvml_source"] == "process" and out["nvml_samples"] >= 2
    assert "uuid" in nvml.calls and "shutdown" in nvml.calls


def test_without_nvml_the_cuda_figures_stand_alone(cuda: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import raises ImportError
    out = measure(runner(), "cuda:0", warmup=0, repeats=1)
    assert out["nvml_peak_mib"] is None and out["nvml_source"] is None and out["nvml_samples"] == 0
    out = measure(runner(), "cuda", warmup=0, repeats=1, nvml=False)
    assert out["nvml_peak_mib"] is None and out["nvml_samples"] == 0 and out["cuda_peak_alloc_mib"] == 30


def test_nvml_sampler_keeps_our_pid_apart_from_the_whole_device(nvml: FakeNvml) -> None:
    s = NvmlSampler(interval_s=0.001)
    assert s.available and s.sample_once() == 3 << 20 and s.source == "process"
    nvml.procs = []  # pid not visible (container): the device's used memory, kept apart
    assert s.sample_once() == 50 << 20
    assert s.source == "process" and s.peak_bytes == 3 << 20
    nvml.fail.add("procs")
    assert s.sample_once() is None  # a failing call never raises out of the sampler
    only_device = NvmlSampler(interval_s=0.001)
    nvml.fail.clear()
    with only_device:
        time.sleep(0.01)
    assert only_device.source == "device" and only_device.peak_bytes == 50 << 20 and only_device.samples >= 2


def test_nvml_handle_by_uuid_else_by_the_visible_index(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="GPU-77"))
    assert NvmlSampler(0)._handle == ("uuid", "GPU-77")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="beef"))
    assert NvmlSampler(0)._handle == ("uuid", "GPU-beef")
    nvml.fail.add("uuid")  # an NVML without UUID lookups: CUDA's index 1 is the driver's device 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert NvmlSampler(1)._handle == ("index", 5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-x,GPU-y")
    assert NvmlSampler(1)._handle == ("index", 1)


def test_nvml_without_a_driver_or_device_is_unavailable(nvml: FakeNvml) -> None:
    nvml.fail.add("init")
    with NvmlSampler() as s:
        pass
    assert not s.available and s.source is None and s.peak_bytes == 0 and s.samples == 0
    nvml.fail = {"uuid", "index", "shutdown"}  # no such device, and shutdown fails too: still no exception
    s = NvmlSampler()
    assert not s.available and s._nvml is None


def test_memory_snapshot_records_one_step_and_always_stops_recording(cuda: dict, tmp_path, monkeypatch) -> None:
    step = runner()
    real = torch.cuda.is_available  # CUDA "is there" for the snapshot's check only; torch's own code asks the real one
    monkeypatch.setattr(torch.cuda, "is_available",
                        lambda: sys._getframe(1).f_globals["__name__"] == M.__name__ or real())
    path = snapshot_meta_step(step, tmp_path / "sub" / "snap.pickle", "cuda")
    assert (tmp_path / "sub" / "snap.pickle").read_bytes() == b"snapshot" and path.endswith("snap.pickle")
    assert cuda["history"] == ["on", None] and len(step.losses) == 2  # warm-up outside the recording, then one
    samples = iter([step.sample()])  # the warm-up gets tasks; the recorded step fails
    step.sample = lambda: next(samples)
    with pytest.raises(StopIteration):
        snapshot_meta_step(step, tmp_path / "x.pickle", "cuda")
    assert cuda["history"] == ["on", None, "on", None]


def test_grad_scaler_path_steps_and_skips_non_finite_steps() -> None:
    """The fp16 path of a meta-step (scaled loss, unscale, step skipped on inf) with PyTorch's GradScaler on
    the CPU; the CUDA scaler runs the same Python with CUDA kernels."""
    step = runner(scaler=torch.amp.GradScaler("cpu"))
    before = [p.detach().clone() for p in step.learner.parameters()]
    step(step.sample())
    assert step.divergence.uses_scaler and step.divergence.skipped_steps == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, step.learner.parameters()))
    real = step.learner.step
    step.learner.step = lambda tasks, loss_scale=1.0: [real(tasks, loss_scale=loss_scale),
                                                       [p.grad.fill_(float("inf")) for p in step.learner.parameters()
                                                        if p.grad is not None]][0]
    frozen = [p.detach().clone() for p in step.learner.parameters()]
    step(step.sample())  # an inf gradient: the scaler skips the update and lowers its scale
    assert step.divergence.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(frozen, step.learner.parameters()))
