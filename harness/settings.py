# long: the one set of rules for every option; parse_memory (issue 22) added past the limit
"""What a valid option is: one set of rules for ``run``, ``bench``, ``sweep`` and ``ablate``.

Issue 13: the same value is valid or invalid for every command, and it is checked before anything
runs or is written.  Sizes are bounded so that a typo (``--inner-steps 1000000000``) is refused
instead of eating the machine; ``--allow-huge`` raises the bounds to larger, still finite ones.

Issue 11: the one ``--set KEY=VALUE`` parser with its one list of accepted keys
(:data:`SETTING_KEYS`, plus ``model.<kw>`` and ``task.<kw>`` of the preset's model and task),
used by the commands and by :meth:`harness.bench.cells.Cell.overrides`.
Try: ``python -m harness bench --set width=abc`` (exit 2, nothing written).
"""
from __future__ import annotations

import inspect
import math
import os
import re
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from harness.core.config import AMP_MODES, STEP_REBUILDS, ConfigError
from harness.variants import Variant
from harness.zoo.presets import Preset, get_preset
from harness.zoo.user import model_keywords, resolve, takes_any_keyword

__all__ = ["CPU_MEM_CAP_ENV", "DATA_SETTINGS", "DEVICES", "DIST_TIMEOUT_ENV", "DTYPES", "NAME_MAX_BYTES", "NUMBER_ENV",
           "check_environment", "env_number", "check_amp", "check_device", "parse_amps", "valid_amps", "check_folder_name", "ACCEPTED", "BOUNDS", "Bound", "CellSettings", "LAUNCH_SETTINGS", "MODEL_SETTINGS", "SEED_MAX", "SETTING_KEYS", "SPEC_SETTINGS",
           "SWEEP_PARAMS", "VARIANT_SETTINGS", "MEMORY_UNITS", "parse_memory", "check_int", "check_seconds", "dedupe", "variant_with",
           "parse_param", "parse_settings", "parse_value", "split_settings", "validate_setting"]

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
    "memory_budget": Bound(1, 2 ** 50, 2 ** 50),  # bytes (parse_memory: 2GiB, 512MiB)
    "ranks": Bound(1, 64, 4_096),  # and at most the meta-batch (harness.loop.distributed.check_ranks)
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

SPEC_SETTINGS = ("inner_steps", "meta_batch")  # RunSpec fields
MODEL_SETTINGS = ("depth", "width")  # model constructor keywords
# step-checkpoint segment length (0: off), its rebuild (segment | step), binomial stored states (0: off);
# vmap tasks (0/1); tasks per vmapped chunk (0: all)
VARIANT_SETTINGS = ("step_ckpt", "step_rebuild", "snapshots", "vectorize", "vmap_chunk", "memory_budget")
LAUNCH_SETTINGS = ("ranks",)  # data-parallel ranks: the cell runs under torch.distributed.run (harness.loop.distributed)
SWEEP_PARAMS = SPEC_SETTINGS + MODEL_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS
SETTING_KEYS = SWEEP_PARAMS + ("amp",)  # and model.<kw>, task.<kw>
ACCEPTED = f"{', '.join(SETTING_KEYS)}, model.<kw> or task.<kw>"
DATA_SETTINGS = ("task.data_root", "task.download")  # a real-data preset's tasks: --data-root, --download


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


def check_environment() -> None:
    """Every numeric environment variable the harness reads (:data:`NUMBER_ENV`), checked."""
    for name in NUMBER_ENV:
        env_number(name)


def parse_value(text: str) -> Any:
    """int, then float, then the string itself (``true``/``false`` as booleans)."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _typed(what: str, text: str, default: Any, bound: str, allow_huge: bool) -> Any:
    """``text`` converted to the type of ``default`` (int, float, bool, str) and checked; ``what`` names it."""
    if isinstance(default, bool):
        value = parse_value(text)
        if not isinstance(value, bool):
            raise ConfigError(f"{what} must be true or false, got {text!r}")
        return value
    if isinstance(default, int):
        return check_int(bound, parse_value(text), allow_huge=allow_huge, flag=what)  # 1e21, abc: not an int
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{what} must be finite, got {text!r}")
        return value
    if isinstance(default, (tuple, list, dict)):
        raise ConfigError(f"{what}: {type(default).__name__} values cannot be set from the command line")
    if not text:
        raise ConfigError(f"{what} is empty")
    return parse_value(text) if default is None or default is inspect.Parameter.empty else text


def _maker(part: str, preset: Preset, model: str | None, tasks: str | None, what: str
           ) -> tuple[Any, dict[str, Any], str]:
    """(callable, its fixed keyword defaults, how to name it) of the model or the tasks a ``--set`` goes to."""
    if part == "model" and model:
        return resolve(model, "--model"), {}, f"--model {model}"
    if part == "task" and tasks:
        raise ConfigError(f"{what}: --tasks {tasks} is called as sampler(n, gen) and takes no keywords; "
                          "set them in the sampler")
    make = preset.make_model if part == "model" else preset.make_task
    fixed = preset.model_kwargs if part == "model" else preset.task_kwargs
    return make, fixed, f"preset {preset.name!r}'s {part} ({make.__name__})"


def validate_setting(key: str, text: str, preset: Preset, *, allow_huge: bool = False, flag: str = "--set",
                     model: str | None = None, tasks: str | None = None) -> Any:
    """One ``KEY=VALUE`` for ``preset``: the key must be one the preset's run, variant, model or task takes
    (with ``model``/``tasks``, a ``--model``/``--tasks`` spec: the keywords of the user's factory)."""
    what = f"{flag} {key}"
    if key == "memory_budget":
        return parse_memory(text, what)
    if key == "step_rebuild":
        if text not in STEP_REBUILDS:
            raise ConfigError(f"{what}={text}: valid choices: {', '.join(STEP_REBUILDS)}")
        return text
    if key in SPEC_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS:
        return _typed(what, text, 0, key, allow_huge)
    if key == "amp":
        if text not in AMP_MODES:
            raise ConfigError(f"{what}={text}: unknown precision; valid choices: {', '.join(AMP_MODES)}")
        return text
    part, kw = ("model", key) if key in MODEL_SETTINGS else key.split(".", 1) if "." in key else ("", key)
    if part not in ("model", "task") or not kw:
        raise ConfigError(f"unknown {flag} key {key!r}; accepted: {ACCEPTED}")
    make, fixed, owner = _maker(part, preset, model, tasks, what)
    params = model_keywords(make)
    if kw not in params and not takes_any_keyword(make):
        raise ConfigError(f"{what}: {owner} takes no {kw!r}; "
                          f"accepted: {', '.join(f'{part}.{p}' for p in params) or '(none)'}")
    default = {**params, **fixed}.get(kw, inspect.Parameter.empty)
    return _typed(what, text, default, kw if kw in BOUNDS else "size", allow_huge)


def parse_settings(items: list[str], preset: str, *, allow_huge: bool = False, model: str | None = None,
                   tasks: str | None = None) -> dict[str, Any]:
    """``["width=32", "task.tokens=8"]`` -> ``{"width": 32, "task.tokens": 8}``, every value checked (against
    the ``--model`` factory's keywords when one is given)."""
    p = get_preset(preset)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad --set {item!r}; expected KEY=VALUE with KEY one of {ACCEPTED}")
        value = validate_setting(key, val.strip(), p, allow_huge=allow_huge, model=model, tasks=tasks)
        if key in out and out[key] != value:  # the same key twice must agree (as a flag and its --set)
            raise ConfigError(f"--set {key}={val.strip()} contradicts --set {key}={out[key]}; give each key once")
        out[key] = value
    return out


def dedupe(values: list[Any]) -> list[Any]:
    """The values in order, each once (``maml,maml`` is one cell)."""
    return list(dict.fromkeys(values))


def parse_param(text: str, preset: str, *, allow_huge: bool = False, model: str | None = None
                ) -> tuple[str, list[Any]]:
    """``sweep --param inner_steps=1,2,4`` -> ``("inner_steps", [1, 2, 4])`` (repeats collapse in the plan)."""
    name, sep, vals = text.partition("=")
    name = name.strip()
    if name not in SWEEP_PARAMS:
        raise ConfigError(f"unknown --param {name!r}; accepted: {', '.join(SWEEP_PARAMS)} (as NAME=V1,V2,...)")
    texts = [v.strip() for v in vals.split(",") if v.strip()] if sep else []
    if not texts:
        raise ConfigError(f"bad --param {text!r}; expected {name}=V1,V2,... with integer values")
    p = get_preset(preset)
    return name, [validate_setting(name, t, p, allow_huge=allow_huge, flag="--param", model=model) for t in texts]


class CellSettings(NamedTuple):
    """A cell's settings by where they go."""

    spec: dict[str, Any]  # RunSpec keywords (inner_steps, meta_batch, amp)
    model: dict[str, Any]  # model constructor keywords
    task: dict[str, Any]  # task sampler keywords
    variant: dict[str, Any]  # replaced on the Variant (step_ckpt, step_rebuild, snapshots, vectorize, vmap_chunk)
    launch: dict[str, Any]  # how the cell's process starts (ranks)


def split_settings(settings: dict[str, Any]) -> CellSettings:
    """Settings (already validated, e.g. read back from a row) sorted by destination; unknown keys raise."""
    out = CellSettings({}, {}, {}, {}, {})
    for k, v in settings.items():
        if k in SPEC_SETTINGS:
            out.spec[k] = int(v)
        elif k == "amp":
            out.spec[k] = str(v)
        elif k in VARIANT_SETTINGS:
            out.variant[k] = str(v) if k == "step_rebuild" else int(v)
        elif k in LAUNCH_SETTINGS:
            out.launch[k] = int(v)
        elif k in MODEL_SETTINGS:
            out.model[k] = v
        elif k.startswith("model.") and len(k) > 6:
            out.model[k[6:]] = v
        elif k.startswith("task.") and len(k) > 5:
            out.task[k[5:]] = v
        else:
            raise ConfigError(f"unknown cell setting {k!r}; accepted: {ACCEPTED}")
    return out


def variant_with(variant: Variant, values: dict[str, Any]) -> Variant:
    """The one place settings become a Variant: VARIANT_SETTINGS in ``values`` (--set or JSON) checked, cast, applied."""
    kw: dict[str, Any] = {k: str(v) if k == "step_rebuild" else check_int(k, int(v) if isinstance(v, bool) else v,
                          allow_huge=True, flag=k) for k, v in values.items() if k in VARIANT_SETTINGS}
    if "vectorize" in kw:
        kw["vectorize"] = bool(kw["vectorize"])
    return replace(variant, **kw) if kw else variant


def check_device(device: str) -> None:
    """An unknown device, or CUDA without CUDA: a ConfigError naming the valid choices."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available on this machine; use --device cpu")


def valid_amps(device: str, *, fp16_on_cpu: bool = False) -> list[str]:
    """The precisions ``device`` can train in: fp16 needs CUDA (GradScaler) unless a CPU GradScaler is asked
    for; bf16 needs a CPU or a GPU that supports it."""
    if device == "cuda":
        return ["off", *(["bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []), "fp16"]
    return ["off", "bf16", *(["fp16"] if fp16_on_cpu else [])]


def check_amp(amp: str, device: str, *, fp16_on_cpu: bool = False) -> None:
    """The one precision check (``run``, ``diagnose``, and each entry of ``bench --amp``)."""
    valid = valid_amps(device, fp16_on_cpu=fp16_on_cpu)
    choices = f"valid choices on {device}: {', '.join(valid)}"
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown precision {amp!r} in --amp; {choices}")
    if amp not in valid:
        why = "fp16 needs a CUDA device (GradScaler)" if amp == "fp16" else f"{amp} is not supported by this GPU"
        raise ConfigError(f"--amp {amp} is not available on {device} ({why}); {choices}")


def parse_amps(text: str, device: str) -> list[str]:
    """``off,bf16[,fp16]`` -> precisions, each once, valid for ``device`` (ConfigError naming the valid ones)."""
    names = dedupe([a.strip() for a in str(text).split(",") if a.strip()])
    if not names:
        raise ConfigError(f"empty --amp; valid choices on {device}: {', '.join(valid_amps(device))}")
    for a in names:
        check_amp(a, device)
    return names
