"""``harness ablate``: what each variant does to meta-test performance.

Every (variant, seed) cell is meta-trained from the same initial weights (the
seed fixes the initialisation and the training task stream, identical across
variants) and evaluated on held-out tasks drawn from a separate generator
(for synthetic images also from a fresh pool of classes, for Omniglot from the
held-out characters).  Each cell is written atomically to
``results/<run-id>/cells/<variant>_s<seed>.json`` and skipped on a rerun, so
an interrupted ablation resumes where it stopped.

The report (``ablation.csv``, ``effects.csv``, ``table.md``, ``summary.json``
and ``plots/<run-id>/learning_curves.png``) holds

* per variant: meta-test loss (and accuracy for classification) with a 95%
  confidence interval over (seed, held-out task) pairs;
* paired effects with 95% CIs: second minus first order, learned minus fixed
  inner LRs, paired over the same seeds and held-out tasks;
* the checkpoint check: every checkpointed variant's learning curves (meta-
  train loss per step, meta-test curve, final per-task losses) against those of
  its non-checkpointed counterpart (same flags with ``layer_ckpt`` off and
  ``step_ckpt`` 0; trained too if not requested), with the largest difference.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from harness.core.config import ConfigError, Task
from harness.core.engine import MetaLearner
from harness.train import Experiment, RunSpec
from harness.train import default_threads as loop_default_threads
from harness.zoo.presets import get_preset
from harness.reporting.provenance import environment
from harness.reporting.schema import SCHEMA_VERSION, write_json, write_text_atomic
from harness.zoo.tasks import SyntheticImages
from harness.variants import CANONICAL, Variant, get_variant, registry

HELDOUT_SEED = 1_000_003  # held-out tasks of seed s come from Generator(HELDOUT_SEED + s)
CELL_SCHEMA = SCHEMA_VERSION  # one schema version for every result (harness.reporting.schema)

# CPU-sized defaults per preset (meta-steps, seeds, meta-batch); others use the preset's sizes and 2 seeds.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": dict(meta_steps=300, seeds=2, meta_batch=10, eval_tasks=100, eval_every=25),
    "quick": dict(meta_steps=20, seeds=2, eval_tasks=20, eval_every=5),
    "conv4": dict(meta_steps=200, seeds=2, eval_tasks=50, eval_every=20),
    "omniglot": dict(meta_steps=2000, seeds=2, eval_tasks=200, eval_every=100),
}


@dataclass(frozen=True)
class AblationSpec:
    preset: str
    variants: tuple[str, ...] = CANONICAL
    meta_steps: int = 100
    seeds: int = 2
    eval_tasks: int = 100
    eval_every: int = 25
    device: str = "cpu"
    dtype: str = "float32"
    meta_batch: int | None = None
    inner_steps: int | None = None
    task_overrides: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    threads: int | None = None  # None: 1 for small models on the CPU, torch's default otherwise

    def __post_init__(self) -> None:
        get_preset(self.preset)
        if not self.variants:
            raise ConfigError("--variants is empty; valid variants: " + ", ".join(registry()))
        for v in self.variants:
            get_variant(v)
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"--variants lists a variant twice: {','.join(self.variants)}")
        for name, value, low in (("meta-steps", self.meta_steps, 1), ("seeds", self.seeds, 1),
                                 ("eval-tasks", self.eval_tasks, 1), ("eval-every", self.eval_every, 1)):
            if value < low:
                raise ConfigError(f"--{name} must be >= {low}, got {value}")
        if self.seeds * self.eval_tasks < 2:
            raise ConfigError("confidence intervals need at least 2 (seed, task) pairs: raise --seeds or --eval-tasks")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if not self.run_id or "/" in self.run_id or self.run_id.startswith("."):
            raise ConfigError(f"--run-id must be a plain folder name, got {self.run_id!r}")
        RunSpec(variant=self.variants[0], preset=self.preset, device=self.device, dtype=self.dtype,
                inner_steps=self.inner_steps, meta_batch=self.meta_batch)  # device/dtype/sizes checks

    def fingerprint(self) -> dict[str, Any]:
        """What a stored cell must match to be reused."""
        overrides = {k: str(v) for k, v in self.task_overrides.items() if k != "download"}
        out = {"preset": self.preset, "meta_steps": self.meta_steps, "eval_tasks": self.eval_tasks,
               "eval_every": self.eval_every, "device": self.device, "dtype": self.dtype,
               "meta_batch": self.meta_batch, "inner_steps": self.inner_steps, "task_overrides": overrides}
        if self.model_overrides:
            out["model_overrides"] = {k: str(v) for k, v in self.model_overrides.items()}
        return out


# -- statistics --------------------------------------------------------------

@lru_cache(maxsize=None)
def t_quantile(df: int, p: float = 0.975) -> float:
    """Student-t quantile by bisection on a Simpson-integrated density (no SciPy needed)."""
    if df < 1:
        return math.nan
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Iterable[float]) -> dict[str, float]:
    """Mean and 95% t-interval; the (seed, task) pairs are the sampling unit."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    m = sum(xs) / n
    if n < 2 or any(not math.isfinite(x) for x in xs):
        return {"mean": m, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": n}


# -- one cell ----------------------------------------------------------------

def heldout_sampler(task: Any) -> Any:
    """Held-out task family: the sampler's own (``heldout()``), fresh classes for synthetic images, else itself."""
    if hasattr(task, "heldout"):
        return task.heldout()
    if isinstance(task, SyntheticImages):
        return replace(task, pool_seed=task.pool_seed + 7919)
    return task


def evaluate(learner: MetaLearner, tasks: list[Task]) -> tuple[list[float], list[float] | None]:
    """Per-task query loss (and accuracy for classification) after the variant's own inner loop.

    Buffers are restored afterwards, so evaluating never changes the training trajectory.
    """
    buffers = {n: b.clone() for n, b in learner.named_buffers()}
    losses: list[float] = []
    accs: list[float] | None = None if tasks[0].query_y.is_floating_point() else []
    for task in tasks:
        fast = {k: v.detach() for k, v in learner.adapt(task.support_x, task.support_y).items()}
        with torch.no_grad():
            out = learner.forward_with(fast, task.query_x)
            losses.append(learner.loss_fn(out, task.query_y).item())
            if accs is not None:
                accs.append((out.argmax(-1) == task.query_y).double().mean().item())
    with torch.no_grad():
        for n, b in learner.named_buffers():
            b.copy_(buffers[n])
    return losses, accs


def run_cell(spec: AblationSpec, variant: Variant, seed: int,
             on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Meta-train one (variant, seed) with Adam and evaluate it on the held-out tasks."""
    run_spec = RunSpec(variant=spec.variants[0], preset=spec.preset, device=spec.device, dtype=spec.dtype,
                       inner_steps=spec.inner_steps, meta_batch=spec.meta_batch, meta_steps=spec.meta_steps, seed=seed)
    exp = Experiment(run_spec, variant=variant, task_overrides=spec.task_overrides,
                     model_overrides=spec.model_overrides)
    heldout = heldout_sampler(exp.task)
    gen = torch.Generator().manual_seed(HELDOUT_SEED + seed)
    eval_tasks = [t.to(exp.device, run_spec.torch_dtype) for t in heldout.sample(spec.eval_tasks, gen)]
    learner = exp.learner
    opt = torch.optim.Adam(learner.parameters(), lr=exp.sizes["outer_lr"])
    train_loss: list[float] = []
    curve_steps, curve_loss, curve_acc = [], [], []

    def record(step: int) -> tuple[list[float], list[float] | None]:
        losses, accs = evaluate(learner, eval_tasks)
        curve_steps.append(step)
        curve_loss.append(sum(losses) / len(losses))
        curve_acc.append(sum(accs) / len(accs) if accs is not None else None)
        return losses, accs

    status, message = "ok", None
    start = time.perf_counter()
    record(0)
    for step in range(1, spec.meta_steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = learner.step(exp.sample())
        if not math.isfinite(loss):
            status, message = "diverged", f"meta-loss became {loss} at meta-step {step}"
            break
        opt.step()
        train_loss.append(loss)
        if on_step is not None:
            on_step()
        if step % spec.eval_every == 0 and step != spec.meta_steps:
            record(step)
    final_loss, final_acc = record(len(train_loss)) if status == "ok" else ([], None)
    wall_s = time.perf_counter() - start
    lrs = {k: v.detach().double().mean().item() for k, v in learner.lrs.values().items()} if learner.lrs else None
    return {"schema": CELL_SCHEMA, "kind": "ablation-cell", "status": status, "message": message,
            "variant": {"name": variant.name, **variant.flags}, "seed": seed, "spec": spec.fingerprint(),
            "sizes": exp.sizes, "train_loss": train_loss, "curve_steps": curve_steps, "curve_test_loss": curve_loss,
            "curve_test_acc": curve_acc if final_acc is not None else None,
            "test_loss": final_loss, "test_acc": final_acc, "learned_lrs": lrs, "wall_s": wall_s}


# -- the ablation ------------------------------------------------------------

def counterpart(v: Variant) -> Variant:
    """The non-checkpointed variant with the same other flags: a registered one if any, else ``v.reference()``."""
    ref = v.reference()
    for r in registry().values():
        if r.flags == ref.flags:
            return r
    return ref


def plan(spec: AblationSpec) -> list[tuple[Variant, str]]:
    """(variant, role) to train: the requested ones, then counterparts the checkpoint check needs."""
    cells = [(get_variant(n), "requested") for n in spec.variants]
    names = set(spec.variants)
    for v, _ in list(cells):
        if v.checkpointed:
            c = counterpart(v)
            if c.name not in names:
                cells.append((c, "counterpart"))
                names.add(c.name)
    return cells


def cell_path(out: Path, variant: str, seed: int) -> Path:
    return out / "cells" / f"{variant.replace('/', '~')}_s{seed}.json"


def load_cell(path: Path, spec: AblationSpec) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        cell = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: recompute
    if cell.get("schema") != CELL_SCHEMA:
        return None
    if cell.get("spec") != spec.fingerprint():
        raise ConfigError(f"{path} was made with another configuration ({cell.get('spec')}); "
                          "pass --force to recompute or choose another --run-id")
    return cell


def default_threads(spec: AblationSpec) -> int | None:
    return loop_default_threads(spec.device, get_preset(spec.preset).model())


def run_ablation(spec: AblationSpec, results_root: Path = Path("results"), plots_root: Path = Path("plots"),
                 force: bool = False, progress: bool | None = None, log: Callable[[str], None] = print,
                 command: str = "") -> dict[str, Any]:
    out, plots = Path(results_root) / spec.run_id, Path(plots_root) / spec.run_id
    cells_plan = plan(spec)
    todo, cells = [], {}
    for v, _ in cells_plan:
        for seed in range(spec.seeds):
            cell = None if force else load_cell(cell_path(out, v.name, seed), spec)
            if cell is None:
                todo.append((v, seed))
            else:
                cells[(v.name, seed)] = cell
    log(f"ablate {spec.preset}: {len(cells_plan)} variants x {spec.seeds} seeds, {spec.meta_steps} meta-steps; "
        f"{len(cells)} cells reused, {len(todo)} to train")
    threads = spec.threads if spec.threads is not None else default_threads(spec)
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    start = time.perf_counter()
    if todo:
        from tqdm import tqdm

        if threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        bar = tqdm(total=len(todo) * spec.meta_steps, unit="step", file=sys.stderr,
                   disable=None if progress is None else not progress, dynamic_ncols=True)
        try:
            for v, seed in todo:
                bar.set_description(f"{v.name} s{seed}")
                cell = run_cell(spec, v, seed, on_step=lambda: bar.update(1))
                if cell["status"] != "ok":
                    bar.update(spec.meta_steps - len(cell["train_loss"]))
                write_json(cell_path(out, v.name, seed), cell)
                cells[(v.name, seed)] = cell
        finally:
            bar.close()
            torch.set_num_threads(prev_threads)
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    train_s = time.perf_counter() - start
    summary = summarise(spec, cells_plan, cells)
    summary["cells_wall_s"] = sum(c["wall_s"] for c in cells.values())
    summary.update({"schema": SCHEMA_VERSION, "kind": "ablation", "run_id": spec.run_id, "command": command,
                    "config": {**asdict(spec), "variants": list(spec.variants),
                               "task_overrides": spec.fingerprint()["task_overrides"], "threads": threads},
                    "trained_cells": len(todo), "reused_cells": len(cells) - len(todo), "train_wall_s": train_s,
                    "env": environment(spec.device)})
    write_report(summary, out, plots)
    summary["paths"] = {"dir": str(out), "plots": str(plots)}
    return summary


def _pooled(cells: dict, name: str, seeds: int, key: str) -> list[float] | None:
    vals: list[float] = []
    for s in range(seeds):
        c = cells[(name, s)]
        if c["status"] != "ok" or c[key] is None:
            return None
        vals.extend(c[key])
    return vals


def _max_diff(a: dict, b: dict) -> float:
    d = 0.0
    for key in ("train_loss", "curve_test_loss", "test_loss", "curve_test_acc", "test_acc"):
        x, y = a.get(key) or [], b.get(key) or []
        if len(x) != len(y):
            return math.inf
        d = max([d] + [abs(p - q) for p, q in zip(x, y) if p is not None and q is not None])
    return d


def summarise(spec: AblationSpec, cells_plan: list[tuple[Variant, str]], cells: dict) -> dict[str, Any]:
    classification = any(c.get("test_acc") is not None for c in cells.values())
    rows = []
    for v, role in cells_plan:
        per_seed = [cells[(v.name, s)] for s in range(spec.seeds)]
        loss = _pooled(cells, v.name, spec.seeds, "test_loss")
        acc = _pooled(cells, v.name, spec.seeds, "test_acc") if classification else None
        row = {"variant": v.name, "role": role, **v.flags,
               "status": "ok" if all(c["status"] == "ok" for c in per_seed) else "diverged",
               "seeds": spec.seeds, "eval_tasks": spec.eval_tasks}
        row.update({f"test_loss_{k}": x for k, x in mean_ci(loss or []).items() if k != "n"})
        if classification:
            row.update({f"test_acc_{k}": x for k, x in mean_ci(acc or []).items() if k != "n"})
        finals = [c["train_loss"][-1] for c in per_seed if c["train_loss"]]
        row["final_train_loss"] = sum(finals) / len(finals) if finals else math.nan
        row["wall_s_per_seed"] = sum(c["wall_s"] for c in per_seed) / len(per_seed)
        if v.checkpointed:
            ref = counterpart(v)
            row["counterpart"] = ref.name
            row["curve_max_abs_diff"] = max(_max_diff(cells[(v.name, s)], cells[(ref.name, s)])
                                            for s in range(spec.seeds))
        else:
            row["counterpart"], row["curve_max_abs_diff"] = "", None
        rows.append(row)
    by_flags = {tuple(sorted(v.flags.items())): v for v, _ in cells_plan}

    def partner(v: Variant, **change: Any) -> Variant | None:
        return by_flags.get(tuple(sorted({**v.flags, **change}.items())))

    effects = []
    metrics = [("test_loss", "meta-test loss", -1)] + ([("test_acc", "meta-test accuracy", 1)] if classification else [])
    for v, _ in cells_plan:
        pairs = []
        if not v.first_order and (b := partner(v, first_order=True)):
            pairs.append(("order", "second - first order", b))
        if v.learn_lr and (b := partner(v, learn_lr=False, lr_per_step=False)):
            pairs.append(("lr", "learned - fixed inner LR", b))
        for effect, label, b in pairs:
            for key, mname, sign in metrics:
                xa, xb = _pooled(cells, v.name, spec.seeds, key), _pooled(cells, b.name, spec.seeds, key)
                if xa is None or xb is None:
                    continue
                ci = mean_ci(a - c for a, c in zip(xa, xb))
                if not (ci["ci_low"] > 0 or ci["ci_high"] < 0):
                    verdict = "no difference within the 95% CI"
                else:
                    better = v.name if sign * ci["mean"] > 0 else b.name
                    verdict = f"{better} better (CI excludes 0)"
                effects.append({"effect": effect, "label": label, "a": v.name, "b": b.name, "metric": mname,
                                "mean_diff": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                                "n_pairs": ci["n"], "verdict": verdict})
    checks = [{"variant": r["variant"], "counterpart": r["counterpart"], "max_abs_diff": r["curve_max_abs_diff"],
               "identical": r["curve_max_abs_diff"] == 0.0} for r in rows if r["counterpart"]]
    curves = {v.name: {"steps": cells[(v.name, 0)]["curve_steps"],
                       "train_loss": [cells[(v.name, s)]["train_loss"] for s in range(spec.seeds)],
                       "test_loss": [cells[(v.name, s)]["curve_test_loss"] for s in range(spec.seeds)],
                       "test_acc": [cells[(v.name, s)]["curve_test_acc"] for s in range(spec.seeds)],
                       "flags": v.flags}
              for v, _ in cells_plan}
    return {"classification": classification, "rows": rows, "effects": effects, "checks": checks,
            "curves": curves, "all_identical": all(c["identical"] for c in checks)}


# -- report ------------------------------------------------------------------

def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    return str(x)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows([{k: _fmt(v, 8) for k, v in r.items()} for r in rows])
    return buf.getvalue()


def markdown_tables(summary: dict[str, Any]) -> str:
    cls = summary["classification"]
    lines = ["| variant | order | inner LR | ckpt | meta-test loss [95% CI] |"
             + (" accuracy [95% CI] |" if cls else "") + " final meta-train loss | s/seed | = counterpart |",
             "|---|---|---|---|---|" + ("---|" if cls else "") + "---|---|---|"]
    for r in summary["rows"]:
        ck = "-" if not (r["layer_ckpt"] or r["step_ckpt"]) else ("layer" if r["layer_ckpt"] else "") + \
            ("+step" if r["layer_ckpt"] and r["step_ckpt"] else ("step" if r["step_ckpt"] else ""))
        same = "" if not r["counterpart"] else (f"{r['counterpart']}: bit-identical" if r["curve_max_abs_diff"] == 0
                                                else f"{r['counterpart']}: max diff {_fmt(r['curve_max_abs_diff'], 3)}")
        name = r["variant"] + (" (counterpart)" if r["role"] == "counterpart" else "") + \
            (" **diverged**" if r["status"] != "ok" else "")
        acc = (f" {r['test_acc_mean']:.3f} [{r['test_acc_ci_low']:.3f}, {r['test_acc_ci_high']:.3f}] |" if cls else "")
        lines.append(f"| {name} | {'first' if r['first_order'] else 'second'} | "
                     f"{'learned' if r['learn_lr'] else 'fixed'} | {ck} | "
                     f"{r['test_loss_mean']:.4f} [{r['test_loss_ci_low']:.4f}, {r['test_loss_ci_high']:.4f}] |"
                     f"{acc} {_fmt(r['final_train_loss'])} | {r['wall_s_per_seed']:.1f} | {same} |")
    lines += ["", "Paired effects (difference a - b over the same seeds and held-out tasks; 95% CI):", "",
              "| effect | a - b | metric | mean difference [95% CI] | verdict |", "|---|---|---|---|---|"]
    for e in summary["effects"]:
        lines.append(f"| {e['label']} | {e['a']} - {e['b']} | {e['metric']} | "
                     f"{e['mean_diff']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}] | {e['verdict']} |")
    return "\n".join(lines) + "\n"


def write_report(summary: dict[str, Any], out: Path, plots: Path) -> None:
    cfg = summary["config"]
    write_text_atomic(out / "ablation.csv", _csv(summary["rows"]))
    write_text_atomic(out / "effects.csv", _csv(summary["effects"]))
    plot_paths = plot_curves(summary, plots)
    env = summary["env"]
    checks = summary["checks"]
    if not checks:
        check_line = "no checkpointed variant in this run"
    elif summary["all_identical"]:
        check_line = (f"all {len(checks)} checkpointed variants have learning curves bit-identical to their "
                      "non-checkpointed counterparts")
    else:
        worst = max(c["max_abs_diff"] for c in checks)
        check_line = f"checkpointed curves differ from their counterparts: largest difference {worst:.3g}"
    metric = "accuracy" if summary["classification"] else "loss"
    text = [f"# Ablation `{summary['run_id']}`: preset `{cfg['preset']}`", "",
            f"Command: `{summary.get('command') or ''}`", "",
            f"{cfg['meta_steps']} meta-steps, {cfg['seeds']} seeds (same initialisation per seed for every variant), "
            f"{cfg['eval_tasks']} held-out tasks per seed; meta-batch {cfg['meta_batch'] or 'preset'}, "
            f"inner steps {cfg['inner_steps'] or 'preset'}, {cfg['device']} {cfg['dtype']}, "
            f"{cfg['threads'] or 'default'} thread(s). Intervals: 95% t-intervals over "
            f"(seed, held-out task) pairs; meta-test {metric} after the variant's own inner loop.", "",
            f"**Checkpoint check:** {check_line}.", "",
            markdown_tables(summary),
            "Curves: " + ", ".join(f"[{p.name}]({Path(os.path.relpath(p, out)).as_posix()})" for p in plot_paths), "",
            f"Environment: torch {env['torch']}, {env['cpu']}, {env['host']}, commit {env['git_commit']}"
            f"{' (dirty)' if env['git_dirty'] else ''}, {env['utc']}; "
            f"this invocation trained {summary['trained_cells']} cells in {summary['train_wall_s']:.1f} s "
            f"and reused {summary['reused_cells']}; the cells' own training + evaluation time sums to "
            f"{summary['cells_wall_s']:.1f} s.", ""]
    write_text_atomic(out / "table.md", "\n".join(text))
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "curves"})


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(summary: dict[str, Any], plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    panels = [("train_loss", "meta-train loss (moving mean over 10% of steps)"), ("test_loss", "meta-test loss")]
    if summary["classification"]:
        panels.append(("test_acc", "meta-test accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette: dict[tuple, str] = {}
    for name, c in curves.items():
        f = c["flags"]
        key = (f["learn_lr"], f["first_order"], f["lr_per_step"])
        color = palette.setdefault(key, colors[len(palette) % len(colors)])
        ckpt = f["layer_ckpt"] or f["step_ckpt"]
        style = dict(color=color, linestyle="--" if ckpt else "-", linewidth=1.2 if ckpt else 2.2, label=name)
        for ax, (key_, title) in zip(axes, panels):
            runs = [r for r in c[key_] if r]
            if not runs or any(len(r) != len(runs[0]) for r in runs):
                continue
            mean = [sum(vals) / len(vals) for vals in zip(*runs)]
            if key_ == "train_loss":
                ax.plot(range(1, len(mean) + 1), _smooth(mean, max(1, len(mean) // 10)), **style)
            else:
                ax.plot(c["steps"][: len(mean)], mean, marker="o" if not ckpt else None, markersize=3, **style)
            ax.set_title(title)
            ax.set_xlabel("meta-step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean over {summary['config']['seeds']} seeds")
    axes[-1].legend(fontsize=8, title="dashed: checkpointed", title_fontsize=8)
    fig.suptitle(f"{summary['run_id']}: preset {summary['config']['preset']}")
    fig.tight_layout()
    path = Path(plots) / "learning_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".learning_curves.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return [path]
