"""Your own model and tasks in the harness (issue 21): ``--model SPEC``, ``--tasks SPEC``, ``--ckpt PATTERN``.

Why this module exists: a user with a model of their own (the seed report's ``nn.ModuleList`` whose forward
calls ``torch.utils.checkpoint.checkpoint`` itself) should not have to write a preset to ask the harness
whether a variant is exact on it and what it costs.  ``SPEC`` is ``pkg.module:NAME`` (imported as
``python -m`` would, the current directory first) or ``path/to/file.py:NAME`` (loaded from that file; its
folder is added to ``sys.path`` after the rest, as running the file would allow its sibling imports).

* ``--model``: ``NAME(**kw)`` returns an ``nn.Module``; ``--set model.<kw>=VALUE`` reaches its keywords
  (checked against its signature, :func:`model_keywords`).  The preset still gives the sizes (inner steps,
  meta-batch, inner and outer LR) and, without ``--tasks``, the task family.
* ``--tasks``: ``NAME(n, gen)`` returns a list of ``n`` :class:`harness.Task` drawn from the
  ``torch.Generator`` ``gen`` (:class:`UserTasks`).  Loss: the sampler's ``loss_fn`` attribute if it has one,
  else cross-entropy for integer targets and MSE otherwise (:func:`default_loss`; MSE refuses outputs and
  targets of different shapes instead of broadcasting them).
* ``--ckpt``: ``fnmatch`` patterns over qualified submodule names (``layers.*``) that the engine checkpoints
  under a ``layer_ckpt`` variant (``MetaConfig.ckpt_modules``).

:func:`check_setup` is what the commands run before anything is written (for the preset's own model too
when ``--set`` gives it or its tasks keywords): it builds the model on the CPU,
samples one task and runs the model's forward and the loss on its support set once (``torch.no_grad``, every
checkpoint a plain call), and matches the ``--ckpt`` patterns; every failure is one line naming the problem.
Errors raised by the user's code are :class:`UserCodeError` (a cell records it as ``error``, not as a
variant refusing the model).  Try: ``python -m harness check --model tests/user_models.py:make_stack --tasks
tests/user_models.py:regression``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.core.ckpt import matching_modules
from harness.core.config import ConfigError, Task
from harness.core.recompute import plain_checkpoints

__all__ = ["SPEC_FORM", "UserCodeError", "UserSpecs", "UserTasks", "build_model", "check_setup", "default_loss",
           "make_model", "make_tasks", "model_keywords", "normalize_spec", "one_line", "reads_real_data", "resolve",
           "spec_name",
           "takes_any_keyword"]

SPEC_FORM = "pkg.module:NAME or path/to/file.py:NAME"
_FILES: dict[str, ModuleType] = {}  # absolute path -> the module loaded from it (factory and sampler share it)


class UserCodeError(ConfigError):
    """The user's factory or sampler failed or returned the wrong thing (one line)."""


class UserSpecs(NamedTuple):
    """A run's ``--model``, ``--tasks`` and ``--ckpt`` (``None``/``()``: the preset's model and tasks)."""

    model: str | None = None
    tasks: str | None = None
    ckpt: tuple[str, ...] = ()

    @property
    def given(self) -> bool:
        return bool(self.model or self.tasks or self.ckpt)

    def fields(self) -> dict[str, Any]:
        """The ones given, as keyword arguments of ``RunSpec``/``Cell``/``AblationSpec``."""
        out: dict[str, Any] = {"model": self.model, "tasks": self.tasks, "ckpt": tuple(self.ckpt)}
        return {k: v for k, v in out.items() if v}


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace collapsed, long messages cut)."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _split(text: str, flag: str) -> tuple[str, str]:
    where, sep, name = str(text).rpartition(":")
    if not sep or not where.strip() or not name.strip() or not name.strip().isidentifier():
        raise ConfigError(f"{flag} {text!r}: expected {SPEC_FORM}")
    return where.strip(), name.strip()


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def normalize_spec(text: str, flag: str = "--model") -> str:
    """The spec as a run records it: a file path relative to the current directory when the file is below it
    (cells run in the directory the command ran in, and committed rows name no machine's folders), else
    absolute; a module kept as written; a spec without ``:`` is a ConfigError naming the valid form."""
    where, name = _split(text, flag)
    if not _is_file(where):
        return f"{where}:{name}"
    path, here = Path(where).expanduser().resolve(), Path.cwd().resolve()
    return f"{path.relative_to(here) if path.is_relative_to(here) else path}:{name}"


def spec_name(text: str) -> str:
    """The ``NAME`` of a spec (a folder-name-safe label for run-ids and file names)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(text).rpartition(":")[2]) or "user"


def _load_file(where: str, flag: str, text: str) -> ModuleType:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{flag} {text}: no file {path}; expected {SPEC_FORM}")
    if str(path) in _FILES:
        return _FILES[str(path)]
    name = f"harness_user_{spec_name(path.stem)}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # after the rest: the file's own sibling imports, nothing shadowed
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UserCodeError(f"{flag} {text}: cannot import {path}: {one_line(exc)}") from None
    _FILES[str(path)] = module
    return module


def _load_module(where: str, flag: str, text: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m harness` run next to the user's code has it
    try:
        return importlib.import_module(where)
    except Exception as exc:  # noqa: BLE001 -- any failure of the user's import is one line
        raise UserCodeError(f"{flag} {text}: cannot import module {where!r}: {one_line(exc)}") from None


def resolve(text: str, flag: str = "--model") -> Callable[..., Any]:
    """The callable a spec names (importing its module or file once); one-line ConfigErrors otherwise."""
    where, name = _split(text, flag)
    module = _load_file(where, flag, text) if _is_file(where) else _load_module(where, flag, text)
    if not hasattr(module, name):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        shown = ", ".join(public[:12]) + (", ..." if len(public) > 12 else "")
        raise ConfigError(f"{flag} {text}: {where} has no attribute {name!r}; its callables: {shown or '(none)'}")
    obj = getattr(module, name)
    if not callable(obj):
        raise ConfigError(f"{flag} {text}: {name} is a {type(obj).__name__}, not a callable")
    return obj


def model_keywords(factory: Callable[..., Any]) -> dict[str, Any]:
    """A factory's keyword parameters and their defaults (``inspect.Parameter.empty`` when required)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: keywords unknown
        return {}
    return {n: p.default for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n != "self"}


def takes_any_keyword(factory: Callable[..., Any]) -> bool:
    """Whether the factory has ``**kwargs`` (every ``--set model.<kw>`` is then passed on as parsed)."""
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False


def build_model(text: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``NAME(**kwargs)`` of a ``--model`` spec, checked to be an ``nn.Module``."""
    factory = resolve(text, "--model")
    kw = dict(kwargs or {})
    call = f"{spec_name(text)}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
    try:
        model = factory(**kw)
    except Exception as exc:  # noqa: BLE001 -- the user's factory failing is one line
        raise UserCodeError(f"--model {text}: {call} raised {one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"--model {text}: {call} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for integer targets, else MSE (which refuses shapes it would silently broadcast)."""
    if not (target.is_floating_point() or target.is_complex()) and target.dtype != torch.bool:
        return F.cross_entropy(pred, target)
    if pred.shape != target.shape:
        raise ValueError(f"MSE needs the model's output and the targets in one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)} (give the sampler a loss_fn attribute for another loss)")
    return F.mse_loss(pred, target)


class UserTasks:
    """A ``--tasks`` sampler as the harness samples task families: ``sample(n, gen)`` and ``loss_fn``."""

    def __init__(self, text: str) -> None:
        self.text, self.sampler = text, resolve(text, "--tasks")
        loss = getattr(self.sampler, "loss_fn", None)
        if loss is not None and not callable(loss):
            raise UserCodeError(f"--tasks {text}: its loss_fn attribute is a {type(loss).__name__}, not a callable")
        self.loss_fn = loss if loss is not None else default_loss

    def sample(self, n: int, gen: torch.Generator) -> list[Task]:
        call = f"--tasks {self.text}: {spec_name(self.text)}({n}, gen)"
        try:
            tasks = self.sampler(n, gen)
        except Exception as exc:  # noqa: BLE001 -- the user's sampler failing is one line
            raise UserCodeError(f"{call} raised {one_line(exc)}") from None
        if not isinstance(tasks, list):
            raise UserCodeError(f"{call} returned {type(tasks).__name__}; expected a list of {n} harness.Task")
        if not tasks:
            raise UserCodeError(f"{call} returned an empty list; expected a list of {n} harness.Task")
        bad = next((i for i, t in enumerate(tasks) if not isinstance(t, Task)), None)
        if bad is not None:
            raise UserCodeError(f"{call} returned a list whose item {bad} is {type(tasks[bad]).__name__}, not a "
                                "harness.Task(support_x, support_y, query_x, query_y)")
        if len(tasks) != n:
            raise UserCodeError(f"{call} returned {len(tasks)} tasks; expected a meta-batch of {n}")
        return tasks

    def heldout(self) -> Any:
        """The sampler's ``heldout`` family if it has one (``ablate`` meta-tests on it), else itself."""
        other = getattr(self.sampler, "heldout", None)
        return other() if callable(other) else self


def make_model(preset: Any, model: str | None, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The user's model when given, else the preset's (with its keyword defaults)."""
    return build_model(model, overrides) if model else preset.model(**(overrides or {}))


def make_tasks(preset: Any, tasks: str | None, overrides: dict[str, Any] | None = None) -> Any:
    """The user's task family when given (it takes no keywords), else the preset's."""
    if tasks and overrides:
        raise ConfigError(f"--set task.<kw> is for the preset's tasks; --tasks {tasks} is called as sampler(n, gen)")
    return UserTasks(tasks) if tasks else preset.task(**(overrides or {}))


def _names_only(preset: Any, overrides: dict[str, Any]) -> nn.Module:
    """The preset's model for its module names: on the meta device (no memory), the CPU if that fails."""
    try:
        with torch.device("meta"):
            return preset.model(**overrides)
    except Exception:  # noqa: BLE001 -- a model whose constructor computes on its weights
        return preset.model(**overrides)


def _check_fit(model: nn.Module, family: Any, dtype: torch.dtype, label: str) -> None:
    """One task sampled; the model's forward and the loss on its support set, once, as a run computes them."""
    task = family.sample(1, torch.Generator().manual_seed(0))[0].to("cpu", dtype)
    x, y = task.support_x, task.support_y
    try:
        model = model.to("cpu", dtype)
    except Exception as exc:  # noqa: BLE001
        raise UserCodeError(f"{label}: moving the model to the CPU in {dtype} failed: {one_line(exc)}") from None
    with torch.no_grad(), plain_checkpoints(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one line is the error; the run itself warns as usual
        try:
            out = model(x)
        except Exception as exc:  # noqa: BLE001 -- shapes that do not fit, one line
            raise UserCodeError(f"{label}: the model's forward on a task's support set (support_x of shape "
                                f"{list(x.shape)}, {x.dtype}) failed: {one_line(exc)}") from None
        try:
            family.loss_fn(out, y)
        except Exception as exc:  # noqa: BLE001
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserCodeError(f"{label}: the loss on the model's output ({shape}) and support_y (shape "
                                f"{list(y.shape)}, {y.dtype}) failed: {one_line(exc)}") from None


def reads_real_data(preset: Any) -> bool:
    """Whether the preset's tasks come from a data set on disk (their sampler takes ``data_root``: omniglot)."""
    return "data_root" in inspect.signature(preset.make_task).parameters


def _keywords_label(preset: Any, model_kwargs: dict[str, Any], task_kwargs: dict[str, Any]) -> str:
    given = [f"model.{k}={v}" for k, v in model_kwargs.items()] + [f"task.{k}={v}" for k, v in task_kwargs.items()]
    return f"preset {preset.name!r} with --set {', '.join(given)}"


def _preset_model(preset: Any, model_kwargs: dict[str, Any], label: str) -> nn.Module:
    try:
        return preset.model(**model_kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a keyword value the model cannot take, one line
        raise ConfigError(f"{label}: building the model failed: {one_line(exc)}") from None


def check_setup(preset: Any, specs: UserSpecs, *, model_kwargs: dict[str, Any] | None = None,
                task_kwargs: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Everything about ``specs`` a run would find out only in its cells, found out now (see the docstring);
    without ``specs``, the preset's model and tasks with the ``--set`` model and task keywords get the same fit
    check (``model.in_dim=5`` against tokens of 8 features: one line naming the keywords and the shapes),
    except for a preset that reads its tasks from disk (:func:`reads_real_data`).

    The global RNG is left as found; nothing is written."""
    model_kwargs, task_kwargs = dict(model_kwargs or {}), dict(task_kwargs or {})
    keywords = bool(model_kwargs or task_kwargs) and not reads_real_data(preset)
    if not specs.given and not keywords:
        return
    with torch.random.fork_rng(devices=[]):
        if specs.model or specs.tasks:
            model = make_model(preset, specs.model, model_kwargs)
            family = make_tasks(preset, specs.tasks, task_kwargs)
            label = " on ".join([f"--model {specs.model}" if specs.model else f"preset {preset.name!r}'s model",
                                 f"--tasks {specs.tasks}" if specs.tasks else f"preset {preset.name!r}'s tasks"])
            _check_fit(model, family, dtype, label)
        elif keywords:
            label = _keywords_label(preset, model_kwargs, task_kwargs)
            model = _preset_model(preset, model_kwargs, label)
            _check_fit(model, make_tasks(preset, None, task_kwargs), dtype, label)
        else:
            model = _names_only(preset, model_kwargs)
        if specs.ckpt:
            matching_modules(model, tuple(specs.ckpt))
