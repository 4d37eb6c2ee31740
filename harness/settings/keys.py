"""The one ``--set KEY=VALUE`` parser with its one list of accepted keys (:data:`SETTING_KEYS`, plus
``model.<kw>`` and ``task.<kw>`` of the preset's model and task), where each setting goes (:func:`split_settings`),
the one place settings become a ``Variant`` (:func:`variant_with`), and the data-root rule.
Try: ``python -m harness bench --set width=abc`` (exit 2, nothing written)."""
from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any, NamedTuple

from harness.core.config import AMP_MODES, STEP_REBUILDS, ConfigError
from harness.settings.bounds import BOUNDS, check_int, parse_memory
from harness.variants import AUTO_SEGMENT, AUTO_SNAPSHOTS, ESTIMATOR_SETTINGS, Variant
from harness.zoo.presets import Preset, get_preset
from harness.zoo.user import model_keywords, reads_real_data, resolve, takes_any_keyword

__all__ = ["ACCEPTED", "PER_K_WORDS", "CellSettings", "DATA_SETTINGS", "LAUNCH_SETTINGS", "MODEL_SETTINGS", "SETTING_KEYS",
           "SPEC_SETTINGS", "SWEEP_PARAMS", "VARIANT_SETTINGS", "check_data_root", "check_ranks", "dedupe",
           "parse_mem_caps", "parse_param", "parse_settings", "parse_value", "split_settings", "validate_setting",
           "variant_with"]

SPEC_SETTINGS = ("inner_steps", "meta_batch")  # RunSpec fields
MODEL_SETTINGS = ("depth", "width")  # model constructor keywords
# step-checkpoint segment length (0: off), its rebuild (segment | step), binomial stored states (0: off);
# vmap tasks (0/1); tasks per vmapped chunk (0: all)
# the estimators' settings: truncated's T, implicit's lambda (a number > 0) and CG iterations
VARIANT_SETTINGS = ("step_ckpt", "step_rebuild", "snapshots", "vectorize", "vmap_chunk", "memory_budget",
                    "truncate_steps", "implicit_lambda", "cg_steps")
LAUNCH_SETTINGS = ("ranks",)  # data-parallel ranks: the cell runs under torch.distributed.run (harness.loop.distributed)
SWEEP_PARAMS = SPEC_SETTINGS + MODEL_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS
SETTING_KEYS = SWEEP_PARAMS + ("amp",)  # and model.<kw>, task.<kw>
ACCEPTED = f"{', '.join(SETTING_KEYS)}, model.<kw> or task.<kw>"
# per-K values, resolved where the config is built (Variant.config): segments of ceil(sqrt K), ceil(log2 K) snapshots
PER_K_WORDS = {"step_ckpt": ("sqrt", AUTO_SEGMENT), "snapshots": ("log2", AUTO_SNAPSHOTS)}
DATA_SETTINGS = ("task.data_root", "task.download")  # a real-data preset's tasks: --data-root, --download


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
    if key == "implicit_lambda":
        value = _typed(what, text, 1.0, key, allow_huge)
        if value <= 0:
            raise ConfigError(f"{what} must be a positive number, got {text!r}")
        return value
    if key == "step_rebuild":
        if text not in STEP_REBUILDS:
            raise ConfigError(f"{what}={text}: valid choices: {', '.join(STEP_REBUILDS)}")
        return text
    if key in PER_K_WORDS and text == PER_K_WORDS[key][0]:
        return text
    if key in SPEC_SETTINGS + VARIANT_SETTINGS + LAUNCH_SETTINGS:
        try:
            return _typed(what, text, 0, key, allow_huge)
        except ConfigError as exc:
            if key not in PER_K_WORDS:
                raise
            raise ConfigError(f"{exc}, or {PER_K_WORDS[key][0]} (per K)") from None
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

    def flat(self) -> dict[str, Any]:
        """The settings as ``--set`` keys again, model keywords as ``model.<kw>`` (:func:`split_settings` of it
        gives these parts back): what rows store and ranks hash."""
        return {**self.spec, **self.variant, **self.launch, **{f"model.{k}": v for k, v in self.model.items()},
                **{f"task.{k}": v for k, v in self.task.items()}}


def split_settings(settings: dict[str, Any]) -> CellSettings:
    """Settings (already validated, e.g. read back from a row) sorted by destination; unknown keys raise."""
    out = CellSettings({}, {}, {}, {}, {})
    for k, v in settings.items():
        if k in SPEC_SETTINGS:
            out.spec[k] = int(v)
        elif k == "amp":
            out.spec[k] = str(v)
        elif k in VARIANT_SETTINGS:
            out.variant[k] = (str(v) if k == "step_rebuild" or _per_k(k, v) else float(v) if k == "implicit_lambda"
                              else int(v))
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


def _per_k(key: str, value: Any) -> bool:
    """Whether ``value`` is the per-K word of ``key`` (``step_ckpt=sqrt``, ``snapshots=log2``)."""
    return key in PER_K_WORDS and value == PER_K_WORDS[key][0]


def _variant_value(key: str, value: Any) -> Any:
    """One variant-level setting cast to its type (a per-K word to the Variant's AUTO value)."""
    if key == "step_rebuild":
        return str(value)
    if key == "implicit_lambda":
        return float(value)
    if _per_k(key, value):
        return PER_K_WORDS[key][1]
    return check_int(key, int(value) if isinstance(value, bool) else value, allow_huge=True, flag=key)


def variant_with(variant: Variant, values: dict[str, Any]) -> Variant:
    """The one place settings become a Variant: VARIANT_SETTINGS in ``values`` (--set or JSON) checked, cast, applied
    (a per-K word becomes the Variant's AUTO value, resolved for K where the config is built)."""
    kw: dict[str, Any] = {k: _variant_value(k, v) for k, v in values.items() if k in VARIANT_SETTINGS}
    for key in kw.keys() & {k for keys in ESTIMATOR_SETTINGS.values() for k in keys}:
        if key not in ESTIMATOR_SETTINGS.get(variant.estimator, ()):
            users = [e for e, keys in ESTIMATOR_SETTINGS.items() if key in keys]
            raise ConfigError(f"{key} is a setting of the {' and '.join(users)} estimator; variant {variant.name!r} "
                              f"uses {variant.estimator if not variant.first_order else 'first_order'} (pick e.g. "
                              f"{'trunc' if 'truncated' in users else 'imaml'}, or leave {key} out)")
    if "vectorize" in kw:
        kw["vectorize"] = bool(kw["vectorize"])
    return replace(variant, **kw) if kw else variant


def check_data_root(preset: str, settings: dict[str, Any]) -> None:
    """A real-data preset without a data root, a data root for a preset that generates its tasks, or
    ``--download`` without a folder to download into: a ConfigError before anything is written."""
    given = [k for k in DATA_SETTINGS if settings.get(k) not in (None, False)]
    if reads_real_data(get_preset(preset)):
        if "task.data_root" not in given:
            raise ConfigError(f"preset {preset!r} reads real data: pass --data-root DIR (and --download to fetch it)")
    elif given:
        raise ConfigError(f"--data-root/--download are for real-data presets; preset {preset!r} generates its tasks")
    if "task.download" in given and "task.data_root" not in given:
        raise ConfigError("--download needs --data-root DIR to download into")


def check_ranks(ranks: Any, meta_batch: int) -> int:
    """``ranks`` as an int in ``1..meta_batch``, else a ConfigError naming the valid range."""
    try:
        n = int(ranks)
    except (TypeError, ValueError):
        raise ConfigError(f"ranks must be an integer, got {ranks!r}; valid: 1..{meta_batch} (the meta-batch)") from None
    if not 1 <= n <= meta_batch:
        raise ConfigError(f"ranks={n} is invalid: each rank needs at least one task of the meta-batch of "
                          f"{meta_batch}; valid: 1..{meta_batch}")
    return n


def parse_mem_caps(items: list[str]) -> dict[str, float]:
    """``VARIANT=MIB`` items (the hidden ``--cpu-mem-cap`` test hook)."""
    caps = {}
    for item in items:
        v, sep, mib = item.partition("=")
        try:
            caps[v.strip()] = float(mib)
        except ValueError:
            raise ConfigError(f"bad --cpu-mem-cap {item!r}; expected VARIANT=MIB") from None
        if not sep:
            raise ConfigError(f"bad --cpu-mem-cap {item!r}; expected VARIANT=MIB")
    return caps
