"""``python -m harness ablate --preset sinusoid``: what each variant buys in meta-test performance.

Meta-trains every requested variant (default: the eight canonical ones) for ``--seeds`` seeds from
identical initialisations, evaluates on held-out tasks, and writes ``<out>/<run-id>/``
(ablation.csv, effects.csv, table.md, summary.json, cells/) and
``plots/<run-id>/learning_curves.png`` (``<out>/plots/<run-id>/`` with an explicit ``--out``).  Finished (variant, seed) cells are
reused on a rerun unless ``--force``.  Every option is checked before a cell trains.
"""
from __future__ import annotations

import argparse
import inspect
from typing import Any

from harness.loop import distributed
from harness.bench.executors import add_executor_arguments, executor_spec, open_executor
from harness.cli.args import (EXIT_FAILED, EXIT_OK, UsageError, add_data_arguments, add_out_argument,
                              add_user_arguments, check_numbers, check_out_dir, check_user_code, merge_flags, nonempty, out_path, plots_root, run_dir,
                              user_specs)
from harness.settings import ACCEPTED, dedupe, parse_settings, split_settings
from harness.studies.ablation.ablate import run_ablation
from harness.studies.ablation.spec import AblationSpec, command_line
from harness.studies.ablation.tables import check_line, markdown_tables
from harness.settings import DEVICES, DTYPES, check_device
from harness.variants import CANONICAL
from harness.zoo.presets import get_preset

__all__ = ["data_overrides", "register", "run", "spec_from_args"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="meta-train variants from the same inits and compare meta-test performance")
    p.add_argument("--preset", default="sinusoid", type=nonempty, help="preset name (see `list`); default sinusoid")
    p.add_argument("--variants", default=",".join(CANONICAL), type=nonempty,
                   help="comma-separated variant names (default: the eight canonical ones)")
    p.add_argument("--meta-steps", type=int, default=None, help="meta-training steps per cell (default per preset)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..S-1 (default per preset, >= 10)")
    p.add_argument("--verify-seeds", type=int, default=None,
                   help="seeds on which checkpointed variants are trained and checked bit for bit (default 2)")
    p.add_argument("--eval-tasks", type=int, default=None, help="held-out tasks per seed (default per preset)")
    p.add_argument("--eval-every", type=int, default=None, help="meta-test curve every E meta-steps")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default per preset)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps K (default: the preset's)")
    p.add_argument("--ways", type=int, default=None, help="N of N-way episodes for image presets (task and model head)")
    p.add_argument("--shots", type=int, default=None, help="K of K-shot episodes for image presets")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"cell setting: {ACCEPTED} (amp and step_ckpt are not ablated)")
    p.add_argument("--allow-huge", action="store_true", help="raise the size limits")
    p.add_argument("--device", default="cpu", type=nonempty, help=f"one of {', '.join(DEVICES)}; default cpu")
    p.add_argument("--dtype", default="float32", type=nonempty, help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for small models, where it is fastest; torch's default otherwise)")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells trained at once in worker processes (default: one per core, at most 2)")
    p.add_argument("--run-id", default=None, type=nonempty, help="output folder name (default ablation-<preset>)")
    add_data_arguments(p)
    p.add_argument("--force", action="store_true", help="recompute cells already stored")
    add_out_argument(p)
    p.add_argument("--results-dir", dest="out", type=out_path, help=argparse.SUPPRESS)  # the old name of --out
    p.add_argument("--plots-dir", type=out_path, default=None, help=argparse.SUPPRESS)  # default: plots_root(--out)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_user_arguments(p)
    add_executor_arguments(p)
    p.set_defaults(handler=run)


def data_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task, model) overrides from --ways/--shots, checked against the preset (--data-root/--download: the
    settings, :func:`harness.cli.args.merge_flags`)."""
    preset = get_preset(args.preset)
    task_params = inspect.signature(preset.make_task).parameters
    task: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for flag, value, key in (("--ways", args.ways, "n_way"), ("--shots", args.shots, "k_shot")):
        if value is None:
            continue
        if key not in task_params:
            raise UsageError(f"{flag} is for N-way K-shot image presets; preset {args.preset!r} has no {key}")
        task[key] = value
        if key == "n_way":
            model["n_way"] = value
    return task, model


def spec_from_args(args: argparse.Namespace) -> AblationSpec:
    """The checked ablation; a UsageError/ConfigError naming the option before anything is trained."""
    if distributed.launched():  # every rank would train the whole ablation and write the same files
        raise UsageError("ablate does not run data-parallel yet: start it without torchrun (it trains cells in "
                         "parallel itself: --jobs, or --executor ray)")
    check_numbers(args)
    check_device(args.device)
    task, model = data_overrides(args)
    user = user_specs(args)
    parts = split_settings(merge_flags(args, parse_settings(args.set, args.preset, allow_huge=args.allow_huge,
                                                            model=user.model, tasks=user.tasks), args.preset))
    if parts.variant or parts.launch or "amp" in parts.spec:
        raise UsageError("ablate compares the variants as registered: --set amp, step_ckpt, step_rebuild, snapshots, "
                         "vectorize, vmap_chunk, memory_budget, truncate_steps, implicit_lambda, cg_steps and ranks "
                         "are not accepted")
    task, model = {**parts.task, **task}, {**parts.model, **model}
    variants = tuple(dedupe([v.strip() for v in args.variants.split(",") if v.strip()]))
    spec = AblationSpec(preset=args.preset, variants=variants, meta_steps=args.meta_steps, seeds=args.seeds,
                        eval_tasks=args.eval_tasks, eval_every=args.eval_every, verify_seeds=args.verify_seeds,
                        device=args.device, dtype=args.dtype, meta_batch=parts.spec.get("meta_batch"),
                        inner_steps=parts.spec.get("inner_steps"), task_overrides=task, model_overrides=model,
                        run_id=args.run_id or "", threads=args.threads, jobs=args.jobs, **user.fields())
    check_user_code(args.preset, user, parts._replace(model=model, task=task), args.dtype)
    return spec


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    out_dir = run_dir(args.out, spec.run_id)
    plots = args.plots_dir if args.plots_dir is not None else plots_root(args.out)
    check_out_dir(plots / spec.run_id, flag="--plots-dir" if args.plots_dir is not None else "plots folder")
    executor = executor_spec(args)
    with open_executor(executor) as ex:
        summary = run_ablation(spec, out_dir.parent, plots, force=args.force, executor=ex,
                               progress=False if args.no_progress else None, command=command_line(spec, args.set))
    print(markdown_tables(summary), end="")
    print("checkpoint check: " + check_line(summary))
    paths = summary["paths"]
    print(f"wrote {paths['dir']}/ablation.csv, table.md and {paths['plots']}/learning_curves.png "
          f"({summary['trained_cells']} cells trained in {summary['train_wall_s']:.1f} s, "
          f"{summary['reused_cells']} reused)")
    return EXIT_OK if all(r["status"] == "ok" for r in summary["rows"]) else EXIT_FAILED
