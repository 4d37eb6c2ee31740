"""NVML: what the driver says this process holds on the GPU, sampled in the background.

The CUDA allocator's peaks (``harness.bench.measure``) miss the CUDA context and memory outside PyTorch's
caching allocator; NVML sees them.  A daemon thread calls ``nvmlDeviceGetComputeRunningProcesses`` every
<= 5 ms and keeps the peak for this pid, falling back to the device's used memory when the pid is not
visible (containers).  ``pynvml`` (``nvidia-ml-py``) is optional: without it or a driver the sampler is
unavailable and the figures are empty.  Run on a GPU: ``python -m harness bench --device cuda``.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import torch

__all__ = ["NvmlSampler"]


class NvmlSampler:
    """Background sampler of this process's GPU memory (bytes), every ``interval_s`` (<= 5 ms).

    ``peak_bytes`` is the maximum of the per-process figure (``source == "process"``)
    or, only when this pid is never visible (containers), of the device's used memory
    (``"device"``); the two are kept apart so a whole-device sample never poses as this
    process's.  Unavailable NVML: ``available`` is false and nothing is sampled.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.002) -> None:
        if interval_s > 0.005:
            raise ValueError("NVML sampling interval must be <= 5 ms")
        self.interval_s, self.device_index = interval_s, device_index
        self.peaks = {"process": 0, "device": 0}
        self.counts = {"process": 0, "device": 0}
        self.available = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        try:
            import pynvml  # optional: nvidia-ml-py
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:  # no driver: degrade to nothing
            return
        self._nvml = pynvml
        try:
            self._handle = _nvml_handle(pynvml, device_index)
            self.available = True
        except pynvml.NVMLError:  # no such device
            self._shutdown()

    @property
    def source(self) -> str | None:
        return "process" if self.counts["process"] else ("device" if self.counts["device"] else None)

    @property
    def peak_bytes(self) -> int:
        return self.peaks[self.source] if self.source else 0

    @property
    def samples(self) -> int:
        return self.counts["process"] + self.counts["device"]

    def sample_once(self) -> int | None:
        nv, pid = self._nvml, os.getpid()
        try:
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return self._record("process", int(proc.usedGpuMemory))
            return self._record("device", int(nv.nvmlDeviceGetMemoryInfo(self._handle).used))
        except nv.NVMLError:  # a failing NVML call must not turn a measured cell into an error
            return None

    def _record(self, source: str, used: int) -> int:
        self.counts[source] += 1
        self.peaks[source] = max(self.peaks[source], used)
        return used

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval_s)

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:  # already shut down by the driver: nothing left to release
            pass
        self._nvml = None

    def __enter__(self) -> "NvmlSampler":
        if self.available:
            self.sample_once()
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample_once()
        if self._nvml is not None:
            self._shutdown()


def _nvml_handle(nv: Any, device_index: int) -> Any:
    """NVML's handle for CUDA device ``device_index``: by UUID (right under any
    CUDA_VISIBLE_DEVICES, UUIDs and MIG included), else by the mapped index."""
    try:
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except (RuntimeError, AssertionError, AttributeError, nv.NVMLError):  # no UUID from torch, or NVML lacks it
        index = device_index
        ids = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if device_index < len(ids) and ids[device_index].isdigit():
            index = int(ids[device_index])
        return nv.nvmlDeviceGetHandleByIndex(index)
