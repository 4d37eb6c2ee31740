"""The argument groups the commands share, and the checks of everything they name, done up front.

Every option of ``run``, ``bench``, ``sweep`` and ``ablate`` goes through :func:`check_numbers`
(the bounds in :mod:`harness.settings`), every ``--out`` through :func:`check_out_dir` and every
run-id through :func:`run_dir`, before anything runs or is written.  A failure is a
:class:`UsageError`: one line, exit code 2 (``EXIT_USAGE``).  Try: ``python -m harness run
--variant maml --seed 100000000000000000000000``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from harness.bench.cells import MeasureOptions, load_cell_plugins
from harness.bench.executors import add_executor_arguments
from harness.bench.paired import DEFAULT_PAIRS
from harness.core.config import AMP_MODES, ConfigError
from harness.loop.spec import RunSpec
from harness.reporting.paths import plots_root, results_root
from harness.settings import (ACCEPTED, DEVICES, DTYPES, CellSettings, check_data_root, check_device,
                              check_folder_name, check_int, check_seconds, dedupe, parse_amps, parse_memory,
                              parse_settings, split_settings)
from harness.zoo.presets import DEFAULT_PRESET, get_preset
from harness.zoo.user import SPEC_FORM, UserSpecs, check_setup, normalize_spec

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "MatrixOptions", "UsageError",
           "add_matrix_arguments", "add_out_argument", "add_spec_arguments", "add_user_arguments", "check_numbers",
           "check_out_dir", "check_user_code", "user_specs",
           "add_data_arguments", "check_run_id", "merge_flags",
           "default_device", "matrix_options", "names_a_path", "nonempty", "out_path", "plots_root", "resolve_run",
           "results_root", "run_dir"]

EXIT_OK = 0  # every cell ok (or unsupported)
EXIT_FAILED = 1  # a regression, or a failed, diverged, killed, out-of-memory or timed-out cell
EXIT_USAGE = 2  # bad input: nothing ran, nothing was written
EXIT_INTERRUPTED = 130  # Ctrl-C
INT_OPTIONS = ("inner_steps", "meta_batch", "meta_steps", "eval_tasks", "eval_every", "seeds", "verify_seeds", "seed",
               "threads", "jobs", "warmup", "repeats", "ways", "shots", "ranks", "pairs", "fd_directions")


class UsageError(ConfigError):
    """Bad command-line input: one line, exit code 2."""


def nonempty(text: str) -> str:
    """argparse type: a non-empty string (``--preset ''`` is not the default preset)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def out_path(text: str) -> Path:
    """argparse type for ``--out``: a non-empty path (``--out ''`` would mean the current directory)."""
    return Path(nonempty(text))


def add_out_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=out_path, default=None, metavar="DIR",  # None: not given (results_root, plots_root)
                   help="results root (default results/, plots in plots/ beside it); with --out DIR the plots go "
                        "to DIR/plots/")


def add_spec_arguments(p: argparse.ArgumentParser, *, variant_required: bool = True) -> None:
    """The cell arguments shared by run, bench and sweep."""
    if variant_required:
        p.add_argument("--variant", required=True, type=nonempty, help="variant name (see `list`)")
    p.add_argument("--preset", default=None, type=nonempty, help="preset name (see `list`)")
    p.add_argument("--device", default=None, type=nonempty,
                   help=f"one of {', '.join(DEVICES)}; default cuda when available")
    p.add_argument("--dtype", default="float32", type=nonempty, help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps K (default: the preset's)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (0..2**62)")
    p.add_argument("--amp", default="off", type=nonempty, help=f"mixed precision: {', '.join(AMP_MODES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"cell setting: {ACCEPTED}")
    p.add_argument("--allow-huge", action="store_true",
                   help="raise the size limits that keep a typo from eating the machine")
    p.add_argument("--memory-budget", default=None, type=nonempty, metavar="SIZE",
                   help="run the fastest exact checkpointing predicted to fit SIZE (binary units: B, KiB, MiB, GiB, "
                        "TiB, e.g. 2GiB) of the memory figure (cpu_peak_alloc_mib); --set memory_budget=SIZE")
    add_data_arguments(p)
    add_user_arguments(p)


def add_user_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--tasks``, ``--ckpt``: the user's own code in place of the preset's (:mod:`harness.zoo.user`)."""
    p.add_argument("--model", default=None, type=nonempty, metavar="SPEC",
                   help=f"your model: {SPEC_FORM}, a callable returning an nn.Module (imported from the current "
                        "directory); its keywords via --set model.<kw>=VALUE. The preset gives the sizes")
    p.add_argument("--tasks", default=None, type=nonempty, metavar="SPEC",
                   help=f"your tasks: {SPEC_FORM}, a callable sampler(n, gen) -> list[harness.Task] (n tasks drawn "
                        "from the torch.Generator gen). Loss: the sampler's loss_fn attribute, else cross-entropy "
                        "for integer (long) query targets and MSE otherwise. Default: the preset's tasks")
    p.add_argument("--ckpt", action="append", default=[], metavar="PATTERN", type=nonempty,
                   help="checkpoint the submodules whose qualified names match (fnmatch, e.g. 'layers.*'; "
                        "repeatable) under a layer_ckpt variant, without editing the model")


def user_specs(args: argparse.Namespace) -> UserSpecs:
    """The ``--model``/``--tasks``/``--ckpt`` of a command, in the form the cells record (file paths relative to the current directory when below it)."""
    model, tasks = getattr(args, "model", None), getattr(args, "tasks", None)
    return UserSpecs(normalize_spec(model, "--model") if model else None,
                     normalize_spec(tasks, "--tasks") if tasks else None,
                     tuple(dedupe(list(getattr(args, "ckpt", None) or []))))


def check_user_code(preset: str, specs: UserSpecs, parts: CellSettings, dtype: str) -> None:
    """The user's model and tasks built, run once on one task and the ``--ckpt`` patterns matched, before
    anything is written (:func:`harness.zoo.user.check_setup`); a ConfigError of one line otherwise.  Call it
    after the run spec is checked (``dtype`` is then valid)."""
    check_setup(get_preset(preset), specs, model_kwargs=parts.model, task_kwargs=parts.task, dtype=DTYPES[dtype])


def add_matrix_arguments(p: argparse.ArgumentParser) -> None:
    """The isolated-cell matrix arguments of bench and sweep."""
    add_spec_arguments(p, variant_required=False)
    p.add_argument("--run-id", default=None, type=nonempty,
                   help="<out>/<run-id>/ (default <preset>-<device>[-settings]); reruns resume")
    add_out_argument(p)
    p.add_argument("--force", action="store_true", help="re-run cells that already have a result")
    p.add_argument("--timeout", type=float, default=300.0, help="per-cell time limit in seconds (default 300)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up meta-steps per cell (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed meta-steps per cell (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per cell (default 1 on CPU: reproducible, pairable timings; torch's on CUDA)")
    p.add_argument("--pairs", type=int, default=None,
                   help=f"alternating (cell, reference) pairs for the paired time ratio (default {DEFAULT_PAIRS})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-nvml", action="store_true", help="no NVML sampler thread (CUDA)")
    p.add_argument("--cpu-mem-cap", action="append", default=[], metavar="VARIANT=MIB", help=argparse.SUPPRESS)
    add_executor_arguments(p)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option the command has, against the one set of bounds (:data:`harness.settings.BOUNDS`)."""
    huge = bool(getattr(args, "allow_huge", False))
    for name in INT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            check_int(name, value, allow_huge=huge)
    if getattr(args, "timeout", None) is not None:
        check_seconds("timeout", args.timeout, allow_huge=huge)


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link: its target's folder does not exist
            raise UsageError(f"{path}: {p} is a broken symbolic link")
        p = p.parent
    return p


def check_out_dir(path: Path, flag: str = "--out") -> Path:
    """``path`` can hold our files: not a file, not below a file, writable (tried, not guessed from the mode
    bits, which root ignores).  Creates nothing: the probe file is removed at once."""
    if not str(path).strip():
        raise UsageError(f"{flag} is empty; give a directory")
    base = _existing_ancestor(Path(path))
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".harness-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {base} ({exc.strerror or exc})") from None
    return Path(path)


def check_run_id(out: Path | None, run_id: str, flag: str = "--run-id") -> Path:
    """``<out>/<run-id>`` (``out``: ``--out`` as parsed, ``None`` for the default root), with a run-id that is
    one plain folder name (no separator, no ``..``)."""
    try:
        check_folder_name(run_id, flag)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return results_root(out) / run_id  # one name without a separator, not '.' or '..': it cannot leave out


def run_dir(out: Path | None, run_id: str, flag: str = "--run-id") -> Path:
    """:func:`check_run_id`, and the folder can be written."""
    return check_out_dir(check_run_id(out, run_id, flag))


class MatrixOptions(NamedTuple):
    """bench's and sweep's options, checked (nothing in ``args`` is changed)."""

    device: str
    preset: str
    settings: dict[str, Any]
    amps: list[str]
    opts: MeasureOptions
    user: UserSpecs = UserSpecs()


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--download``: where a real-data preset (omniglot) reads its tasks (every command)."""
    p.add_argument("--data-root", default=None, type=nonempty, metavar="DIR",
                   help="dataset root of a real-data preset (omniglot; the same as --set task.data_root=DIR)")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-root (torchvision)")


def merge_flags(args: argparse.Namespace, settings: dict[str, Any], preset: str) -> dict[str, Any]:
    """``--inner-steps``, ``--meta-batch``, ``--amp``, ``--data-root`` and ``--download`` into the ``--set``
    settings (the same key twice must agree), and the one data rule: a preset that reads its tasks from disk
    (omniglot) needs a data root, every other preset takes none."""
    out = dict(settings)
    budget = getattr(args, "memory_budget", None)
    flags = {"inner_steps": args.inner_steps, "meta_batch": args.meta_batch,
             "memory_budget": None if budget is None else parse_memory(budget),
             "amp": None if getattr(args, "amp", "off") == "off" else args.amp,
             "task.data_root": getattr(args, "data_root", None),
             "task.download": getattr(args, "download", None) or None}
    for name, value in flags.items():
        if value is None:
            continue
        flag = {"task.data_root": "--data-root", "task.download": "--download"}.get(name, f"--{name.replace('_', '-')}")
        if name in out and out[name] != value:
            raise UsageError(f"{flag} {value} contradicts --set {name}={out[name]}")
        out[name] = value
    check_data_root(preset, out)
    return out


def matrix_options(args: argparse.Namespace, *, multi_amp: bool) -> MatrixOptions:
    """Every option of a matrix command checked, in the order a user would fix them."""
    check_numbers(args)
    load_cell_plugins()  # a HARNESS_CELL_PLUGINS module that does not import: refused before anything is written
    device = args.device if args.device is not None else default_device()
    check_device(device)
    preset = args.preset if args.preset is not None else DEFAULT_PRESET[device]
    user = user_specs(args)
    settings = merge_flags(args, parse_settings(args.set, preset, allow_huge=args.allow_huge, model=user.model,
                                                tasks=user.tasks), preset)
    amps = parse_amps(settings.pop("amp", "off"), device)
    if len(amps) > 1 and not multi_amp:
        raise UsageError(f"--amp takes one precision here, got {args.amp!r} (bench takes a list)")
    for amp in amps:  # the run-spec rules (dtype, precision, sizes) exactly as the cells will apply them
        RunSpec(variant="maml", preset=preset, device=device, dtype=args.dtype, seed=args.seed, amp=amp,
                inner_steps=settings.get("inner_steps"), meta_batch=settings.get("meta_batch"))
    check_user_code(preset, user, split_settings(settings), args.dtype)
    repeats = args.repeats if args.repeats is not None else (5 if device == "cuda" else 3)
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    opts = MeasureOptions(warmup=args.warmup, repeats=repeats, timeout_s=args.timeout, nvml=not args.no_nvml,
                          threads=threads, pairs=args.pairs)
    return MatrixOptions(device, preset, settings, amps, opts, user)


def resolve_run(text: str, out: Path | None = None, *, file: bool = False) -> Path:
    """A run directory (``results/<run-id>``, or its ``cells.jsonl``), or a bare run-id under ``out``.  With
    ``file``, a ``.jsonl`` path is that file exactly (``compare`` reads the files it is given); without, its folder."""
    p = Path(text)
    if names_a_path(text):
        return p.parent if p.suffix == ".jsonl" and not file else p
    return check_run_id(out, text, flag="run")


def names_a_path(text: str) -> bool:
    """Whether a ``RUN`` argument is a path (an existing folder, a ``.jsonl`` or several parts), not a run-id."""
    p = Path(text)
    return p.is_dir() or p.suffix == ".jsonl" or len(p.parts) > 1
