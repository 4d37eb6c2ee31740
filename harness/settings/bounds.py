"""Bounds on every number the harness takes, and the checks that apply them: sizes (``--inner-steps``,
``--allow-huge``), seconds, run-ids, numeric environment variables.  Try ``python -m harness run --inner-steps 1000000000``
(exit 2, nothing written)."""
from __future__ import annotations

import math
import os
import re
from typing import Any, NamedTuple

import torch

from harness.core.config import ConfigError

__all__ = ["BOUNDS", "CELL_START_ENV", "CELL_STARTS", "MEMORY_UNITS", "cell_start", "parse_memory", "Bound", "CPU_MEM_CAP_ENV", "DEVICES", "DIST_TIMEOUT_ENV", "DTYPES", "NAME_MAX_BYTES",
           "NUMBER_ENV", "SEED_MAX", "check_environment", "check_folder_name", "check_int", "check_seconds",
           "env_number"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("cpu", "cuda")
NAME_MAX_BYTES = 255  # a file name's limit on Linux, macOS and Windows file systems (NAME_MAX)
SEED_MAX = 2 ** 62  # torch.Generator takes 64-bit seeds; derived streams (seed + 1, held-out seeds) need room


class Bound(NamedTuple):
    """Valid values ``lo..hi``; ``huge`` replaces ``hi`` under ``--allow-huge`` (still finite)."""

    lo: float
    hi: float
    huge: float


BOUNDS: dict[str, Bound] = {
    "inner_steps": Bound(0, 1_000, 100_000),
    "meta_batch": Bound(1, 1_024, 1_000_000),
    "meta_steps": Bound(0, 100_000, 100_000_000),
    "eval_tasks": Bound(1, 100_000, 100_000),
    "eval_every": Bound(1, 100_000, 100_000_000),
    "seeds": Bound(2, 10_000, 10_000),  # ablate: intervals over seeds need 2 (harness.studies.ablation.spec)
    "verify_seeds": Bound(1, 10_000, 10_000),
    "jobs": Bound(1, 256, 256),
    "seed": Bound(0, SEED_MAX, SEED_MAX),
    "threads": Bound(1, 1_024, 1_024),
    "warmup": Bound(0, 1_000, 1_000_000),
    "repeats": Bound(1, 10_000, 1_000_000),
    "pairs": Bound(1, 10_000, 1_000_000),  # bench: paired-ratio pairs; scaling: 1-rank/N-rank pairs
    "fd_directions": Bound(0, 100, 10_000),  # check: finite-difference directions (0: none)
    "depth": Bound(1, 256, 100_000),
    "width": Bound(1, 16_384, 1_000_000),
    "step_ckpt": Bound(0, 1_000, 100_000),
    "snapshots": Bound(0, 1_000, 100_000),  # binomial step checkpointing's stored states; 0: off
    "vectorize": Bound(0, 1, 1),
    "vmap_chunk": Bound(0, 100_000, 100_000_000),  # 0: all tasks at once
    "memory_budget": Bound(1, 2 ** 50, 2 ** 50),
    "truncate_steps": Bound(0, 1_000, 100_000),  # truncated: the last T inner steps back-propagated
    "cg_steps": Bound(1, 1_000, 100_000),  # implicit: conjugate-gradient iterations  # bytes (parse_memory: 2GiB, 512MiB)
    "ranks": Bound(1, 64, 4_096),  # and at most the meta-batch (harness.settings.keys.check_ranks)
    "ways": Bound(1, 1_000, 100_000),
    "shots": Bound(1, 1_000, 100_000),
    "size": Bound(1, 100_000, 100_000_000),  # any other integer model.<kw> / task.<kw>
    "timeout": Bound(1e-3, 86_400.0, 30 * 86_400.0),  # seconds
}

# environment variables holding a number: (unit, largest value); each a positive finite number, unset or empty:
# the default.  Checked by every command before it starts (harness.cli.main) and where they are read.
CPU_MEM_CAP_ENV = "MAML_HARNESS_CPU_MEM_CAP_MIB"  # test hook: the CPU tracker raises MemoryError above this
DIST_TIMEOUT_ENV = "HARNESS_DIST_TIMEOUT_S"  # the collective timeout of data-parallel ranks
NUMBER_ENV: dict[str, tuple[str, float]] = {CPU_MEM_CAP_ENV: ("MiB", 2.0 ** 40),
                                            DIST_TIMEOUT_ENV: ("seconds", BOUNDS["timeout"].huge)}
# how a bench cell's process starts (harness.bench.forked): forked from a server that has imported torch and the
# harness (Linux; the default), or a fresh interpreter (today's way elsewhere, and the fallback)
CELL_START_ENV = "HARNESS_CELL_START"
CELL_STARTS = ("fork", "fresh")

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _num(x: float) -> str:
    return "2**62" if x == SEED_MAX else str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_int(name: str, value: Any, *, allow_huge: bool = False, flag: str | None = None) -> int:
    """``value`` as an int within ``BOUNDS[name]``; a ConfigError naming the flag and the valid range."""
    flag = flag or _flag(name)
    b = BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{flag} must be an integer in {_num(b.lo)}..{_num(b.hi)}, got {value!r}")
    hi = b.huge if allow_huge else b.hi
    if not b.lo <= value <= hi:
        more = f" (--allow-huge raises the limit to {_num(b.huge)})" if value > hi and b.huge > hi else ""
        raise ConfigError(f"{flag} must be in {_num(b.lo)}..{_num(hi)}, got {value}{more}")
    return value


def check_folder_name(name: str, flag: str = "--run-id") -> str:
    """A run-id: one plain folder name (no path separator, not ``.``/``..``, not hidden, at most
    :data:`NAME_MAX_BYTES` bytes), else a ConfigError."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if (not name.strip() or any(s in name for s in seps) or name in (".", "..") or name.startswith(".")
            or "\0" in name):
        raise ConfigError(f"{flag} must be one plain folder name (no path separator, not starting with '.'), "
                          f"got {name!r}")
    size = len(os.fsencode(name))
    if size > NAME_MAX_BYTES:
        raise ConfigError(f"{flag} must be a folder name of at most {NAME_MAX_BYTES} bytes, got {size} bytes "
                          f"({name[:20]!r}...); give a shorter --run-id")
    return name


def check_seconds(name: str, value: float, *, allow_huge: bool = False, flag: str | None = None) -> float:
    """A finite, positive, bounded number of seconds (``nan`` and ``inf`` are refused)."""
    flag = flag or _flag(name)
    b = BOUNDS[name]
    hi = b.huge if allow_huge else b.hi
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not b.lo <= value <= hi:
        more = " (--allow-huge raises the limit)" if isinstance(value, (int, float)) and value > hi else ""
        raise ConfigError(f"{flag} must be a finite number of seconds in {_num(b.lo)}..{_num(hi)}, got {value!r}{more}")
    return float(value)


def env_number(name: str) -> float | None:
    """The environment variable ``name`` (one of :data:`NUMBER_ENV`) as a number in (0, its largest value];
    ``None`` when it is unset or empty; a ConfigError naming it otherwise (``abc``, ``-5``, ``nan``)."""
    text = os.environ.get(name, "")
    if not text.strip():
        return None
    unit, hi = NUMBER_ENV[name]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= hi):
        raise ConfigError(f"environment variable {name}={text!r} must be a positive finite number of {unit} "
                          f"(at most {_num(hi)}); unset it for the default")
    return value


def cell_start() -> str:
    """:data:`CELL_START_ENV`: ``fork`` (also when unset or empty) or ``fresh``; a ConfigError naming both otherwise."""
    text = os.environ.get(CELL_START_ENV, "").strip()
    if text and text not in CELL_STARTS:
        raise ConfigError(f"environment variable {CELL_START_ENV}={text!r} must be one of {', '.join(CELL_STARTS)}; "
                          "unset it for the default (fork)")
    return text or CELL_STARTS[0]


def check_environment() -> None:
    """Every environment variable the harness reads (:data:`NUMBER_ENV`, :data:`CELL_START_ENV`), checked."""
    for name in NUMBER_ENV:
        env_number(name)
    cell_start()


MEMORY_UNITS = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}  # binary units only


def parse_memory(text: str, flag: str = "--memory-budget") -> int:
    """``2GiB``, ``512MiB``, ``1.5GiB`` (binary units: B, KiB, MiB, GiB, TiB) -> bytes; a ConfigError naming the
    accepted form for ``abc``, ``0``, a negative size, a bare number or a decimal unit (``GB``: 10**9 or 2**30?)."""
    form = f"a positive size with a binary unit ({', '.join(MEMORY_UNITS)}), e.g. 2GiB or 512MiB"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = {u.lower(): u for u in MEMORY_UNITS}.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ConfigError(f"{flag} must be {form}; got {text!r}")
    size = float(m.group(1)) * MEMORY_UNITS[unit]
    if not (math.isfinite(size) and 1 <= size <= BOUNDS["memory_budget"].hi):
        raise ConfigError(f"{flag} must be {form}, at least 1B and at most 1024TiB; got {text!r}")
    return int(size)
