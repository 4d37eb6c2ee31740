"""Memory and time of one meta-step.

A *meta-step* is what :func:`harness.loop.train.train` does once: ``MetaLearner.step(tasks)``
(forward, inner loop, outer backward into ``.grad``) plus the Adam step and
``zero_grad``.  Task sampling happens outside the measured region.

Memory, three figures:

* **CPU, deterministic** (:class:`LiveBytesTracker`): a ``TorchDispatchMode``
  sees every tensor an operator returns; each new untyped storage is counted
  once (views share it) and a ``weakref.ref`` callback on the storage subtracts it
  when the storage is freed.  ``cpu_peak_alloc_mib`` is the peak of the live
  bytes allocated during the meta-step.  It depends only on the sequence of
  operators and their shapes, so two runs with the same seed give the same
  number on any machine, and CI (no GPU) can regress on it.
* **CUDA allocator**: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
  over the measured meta-steps after ``reset_peak_memory_stats``, absolute and
  above the pre-step baseline.
* **NVML** (:class:`harness.bench.nvml.NvmlSampler`): this process's GPU memory
  sampled by a background thread, the CUDA context included.

Time: warm-up meta-steps, then timed meta-steps (CUDA events on the GPU,
``time.perf_counter`` on the CPU); median, IQR, min and count, with a warning
when IQR/median exceeds 10%.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
import weakref
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness.bench.nvml import NvmlSampler
from harness.core.config import ConfigError, Task
from harness.loop.train import StepRunner
from harness.settings import CPU_MEM_CAP_ENV, env_number

__all__ = ["CudaPeaks", "LiveBytesTracker", "measure", "measure_cpu_memory", "snapshot_meta_step", "time_stats",
           "noise_warning", "NvmlSampler", "MIB", "NOISY_IQR", "NVML_STEPS", "CAP_ENV"]

MIB = 1024.0 * 1024.0
NOISY_IQR = 0.10
NVML_STEPS = 3  # meta-steps of the separate, untimed NVML pass
CAP_ENV = CPU_MEM_CAP_ENV  # test hook: the CPU tracker raises MemoryError above this (checked: harness.settings)


# Types that hold no tensor: skipped without a look inside.  Anything not listed here, a list, a tuple or
# a tensor goes through ``tree_flatten``, so the tensors found are exactly those ``tree_flatten`` finds.
_NO_TENSOR = frozenset({type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout,
                        torch.memory_format})
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})  # tensors, never pytree nodes


def _tensors(tree: Any, found: list[torch.Tensor]) -> list[torch.Tensor]:
    """Append the tensors among the leaves of ``tree`` (as ``tree_flatten`` lists them) to ``found``.

    An operator's arguments and results are tensors, scalars and flat lists or tuples of them; those are
    walked here, in ``tree_flatten``'s order, and anything else is left to ``tree_flatten``."""
    kind = type(tree)
    if kind in _PLAIN_TENSORS:
        found.append(tree)
    elif kind in _NO_TENSOR:
        pass
    elif kind is tuple or kind is list:
        for item in tree:
            _tensors(item, found)
    elif kind is dict:
        for item in tree.values():
            _tensors(item, found)
    else:
        found.extend(leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor))
    return found


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse/meta/tensor subclasses without storage
        return None


def _input_storages(args: tuple, kwargs: dict | None) -> set[int | None]:
    """The storage keys of an operator's tensor arguments (None for a tensor without storage)."""
    keys: set[int | None] = set()
    try:
        for a in args:
            kind = type(a)
            if kind in _PLAIN_TENSORS:
                keys.add(a.untyped_storage()._cdata)
            elif kind not in _NO_TENSOR:
                keys.update(_storage_key(t) for t in _tensors(a, []))
    except (RuntimeError, NotImplementedError):  # a tensor without storage: the slow way
        keys = {_storage_key(t) for t in _tensors(args, [])}
    if kwargs:
        keys.update(_storage_key(t) for t in _tensors(kwargs, []))
    return keys


class _StorageRef(weakref.ref):
    """A weak reference to a counted storage; its callback, at the free, finds the storage by ``key``."""

    __slots__ = ("key",)


class LiveBytesTracker(TorchDispatchMode):
    """Live bytes of the storages allocated by operators run inside the block, and their peak.

    Storages that existed before the block (parameters, the task tensors) are
    not counted; each storage is counted once however many views of it are
    returned.  ``cap_bytes`` (or the ``MAML_HARNESS_CPU_MEM_CAP_MIB`` environment
    variable) turns the tracker into a memory limit: exceeding it raises
    :class:`MemoryError`, so a cell can be driven out of memory on purpose.

    Cost: one Python call per operator.  The arguments are looked at only when a result has a storage not
    seen yet, and a free is a ``weakref.ref`` callback (``weakref.finalize`` costs several times more);
    ``tests/test_memory_tracker_fast.py`` holds the figure equal to a straightforward reference counter's.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # no torch._disable_dynamo wrapper around __torch_dispatch__: it costs a call per operator and
        # imports torch._dynamo (seconds) at the first one; nothing under the tracker is compiled
        return False

    def __init__(self, cap_bytes: int | None = None) -> None:
        super().__init__()
        cap_mib = env_number(CAP_ENV) if cap_bytes is None else None
        if cap_mib is not None:
            cap_bytes = int(cap_mib * MIB)
        self.cap_bytes = cap_bytes
        self.live = 0
        self.peak = 0
        self.allocated = 0  # total bytes ever allocated in the block
        self._seen: dict[int, tuple[int, _StorageRef]] = {}  # storage key -> (nbytes, its free hook)

    def _freed(self, ref: "_StorageRef") -> None:
        entry = self._seen.pop(ref.key, None)
        if entry is not None:
            self.live -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        results = (out,) if type(out) in _PLAIN_TENSORS else _tensors(out, [])
        seen = self._seen
        inputs: set[int | None] | None = None
        for t in results:
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse/meta/tensor subclasses without storage
                continue
            key = st._cdata
            if key in seen:  # a view of, or an in-place write to, a storage already counted
                continue
            nbytes = st.nbytes()
            if nbytes == 0:
                continue
            if inputs is None:
                inputs = _input_storages(args, kwargs)
            # a view of, or an in-place write to, an input allocates nothing: skip storages that
            # existed before (parameters, optimizer state, task tensors)
            if key in inputs:
                continue
            ref = _StorageRef(st, self._freed)
            ref.key = key
            seen[key] = (nbytes, ref)
            self.live += nbytes
            self.allocated += nbytes
            if self.live > self.peak:
                self.peak = self.live
            if self.cap_bytes is not None and self.live > self.cap_bytes:
                raise MemoryError(f"CPU memory cap exceeded: {self.live / MIB:.3f} MiB live > cap "
                                  f"{self.cap_bytes / MIB:.3f} MiB ({CAP_ENV})")
        return out

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB


# -- time -------------------------------------------------------------------
def time_stats(samples_s: Sequence[float]) -> dict[str, Any]:
    """Median, IQR, min and count (milliseconds), and whether the spread is suspicious."""
    xs = sorted(samples_s)
    if not xs:
        return {"median_ms": None, "iqr_ms": None, "min_ms": None, "count": 0, "noisy": None}
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    med = statistics.median(xs)
    return {"median_ms": med * 1e3, "iqr_ms": iqr * 1e3, "min_ms": xs[0] * 1e3, "count": len(xs),
            "noisy": bool(med > 0 and iqr / med > NOISY_IQR)}


def noise_warning(stats: dict[str, Any], label: str) -> str | None:
    if stats.get("noisy"):
        return (f"warning: {label}: timing is noisy, IQR/median = "
                f"{stats['iqr_ms'] / stats['median_ms']:.0%} > {NOISY_IQR:.0%}")
    return None


# -- meta-step ----------------------------------------------------------------
def measure_cpu_memory(step: StepRunner, tasks: list[Task], cap_bytes: int | None = None) -> dict[str, Any]:
    """One meta-step under :class:`LiveBytesTracker`: the deterministic memory figure."""
    gc.collect()
    tracker = LiveBytesTracker(cap_bytes)
    with tracker:
        step(tasks)
    gc.collect()
    return {"cpu_peak_alloc_mib": tracker.peak / MIB, "cpu_total_alloc_mib": tracker.allocated / MIB}


class CudaPeaks:
    """CUDA allocator peaks over a block (MiB), absolute and above the block's start; shared by
    :func:`measure` and ``harness.bench.single`` (``python -m harness run``)."""

    def __init__(self, device: torch.device | str) -> None:
        self.dev = torch.device(device)
        self.figures: dict[str, float] = {}

    def __enter__(self) -> "CudaPeaks":
        torch.cuda.synchronize(self.dev)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(self.dev)
        self.base_alloc = torch.cuda.memory_allocated(self.dev)
        self.base_reserved = torch.cuda.memory_reserved(self.dev)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.dev)
        peak_alloc = torch.cuda.max_memory_allocated(self.dev)
        peak_reserved = torch.cuda.max_memory_reserved(self.dev)
        self.figures = {
            "cuda_peak_alloc_mib": peak_alloc / MIB,
            "cuda_peak_alloc_above_base_mib": (peak_alloc - self.base_alloc) / MIB,
            "cuda_peak_reserved_mib": peak_reserved / MIB,
            "cuda_peak_reserved_above_base_mib": (peak_reserved - self.base_reserved) / MIB,
        }


def measure(step: StepRunner, device: torch.device | str, *, warmup: int = 1, repeats: int = 5,
            nvml: bool = True, cap_bytes: int | None = None) -> dict[str, Any]:
    """Warm-up, the CPU memory figure, then ``repeats`` timed meta-steps (CUDA allocator peaks over those),
    then a separate untimed pass of up to ``NVML_STEPS`` steps under the NVML sampler.

    Returns a flat dict of memory figures (MiB) and ``time`` statistics (ms).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        step(step.sample())
    out: dict[str, Any] = {}
    out.update(measure_cpu_memory(step, step.sample(), cap_bytes))
    batches = [step.sample() for _ in range(repeats)]
    samples: list[float] = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batches]
        with CudaPeaks(dev) as peaks:
            for tasks, (a, b) in zip(batches, events):
                a.record()
                step(tasks)
                b.record()
        samples = [a.elapsed_time(b) / 1e3 for a, b in events]
        out.update(peaks.figures)
        # NVML in its own, untimed pass: the sampler thread must not slow the timed steps
        sampler = NvmlSampler(dev.index if dev.index is not None else torch.cuda.current_device()) if nvml else None
        if sampler is not None:
            with sampler:
                for tasks in batches[:NVML_STEPS]:
                    step(tasks)
                torch.cuda.synchronize(dev)
        out.update({
            "nvml_peak_mib": (sampler.peak_bytes / MIB) if sampler is not None and sampler.available else None,
            "nvml_source": sampler.source if sampler is not None else None,
            "nvml_samples": sampler.samples if sampler is not None else 0,
        })
    else:
        for tasks in batches:
            t0 = time.perf_counter()
            step(tasks)
            samples.append(time.perf_counter() - t0)
    out["time"] = time_stats(samples)
    return out


def snapshot_meta_step(step: StepRunner, path: str | os.PathLike, device: torch.device | str) -> str:
    """Record the CUDA allocator history over one meta-step and dump a snapshot for
    https://pytorch.org/memory_viz (``torch.cuda.memory._dump_snapshot``)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError("--memory-snapshot needs CUDA (the allocator history is a CUDA feature); use --device cuda")
    step(step.sample())  # warm-up outside the recording
    torch.cuda.synchronize(dev)
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        step(step.sample())
        torch.cuda.synchronize(dev)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return str(path)
