"""Cells: one (variant x preset x settings) measurement, each in its own process.

A cell runs in a fresh ``python -m harness.bench.cells`` subprocess (so an
out-of-memory, a crash or a hang cannot take the matrix down and every cell
starts from the same allocator state).  Its row in ``results/<run-id>/cells.jsonl``
has one of the statuses

* ``ok`` -- measured;
* ``oom`` -- ``torch.cuda.OutOfMemoryError`` or ``MemoryError`` (the CPU tracker
  raises the latter above a cap, see ``--cpu-mem-cap``);
* ``error`` -- any other exception (type and message kept), or the process died;
* ``timeout`` -- the per-cell time limit passed and the process was killed;
* ``diverged`` -- the meta-loss became NaN/inf;
* ``unsupported`` -- a peer cell the peer cannot express (or not installed).

``cells.jsonl`` is rewritten atomically after every cell, so an interrupted
matrix resumes: cells with a row are skipped unless ``force``.

Learner builders are pluggable: a cell named ``peer:variant`` (``higher:maml``)
is built by ``harness.studies.peers.build_peer(peer, variant, exp)``, which returns an
object with ``meta_gradients(tasks)``, ``step(tasks)`` and ``parameters()``;
other builders can be registered in :data:`BUILDERS` (``prefix -> fn(peer,
variant, exp)``) before the cells run (the registration must happen at import
of a module named in ``HARNESS_CELL_PLUGINS``, comma separated, since the cell
runs in a fresh process).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.core.config import ConfigError
from harness.reporting.schema import SCHEMA_VERSION, write_jsonl
from harness.settings import MODEL_SETTINGS, SPEC_SETTINGS, SWEEP_PARAMS, VARIANT_SETTINGS, parse_value, split_settings

REPO = Path(__file__).resolve().parents[2]
STATUSES = ("ok", "oom", "error", "timeout", "diverged", "unsupported")
PLUGIN_ENV = "HARNESS_CELL_PLUGINS"

Builder = Callable[[str, Any, Any], Any]
BUILDERS: dict[str, Builder] = {}  # peer prefix -> builder; empty prefix falls back to harness.studies.peers


class ResultsError(ConfigError):
    """A results directory or baseline is missing, truncated or of another schema (one line, exit 2)."""


@dataclass(frozen=True)
class MeasureOptions:
    warmup: int = 1
    repeats: int = 5
    timeout_s: float = 300.0
    nvml: bool = True
    cpu_mem_cap_mib: float | None = None
    threads: int | None = None  # torch.set_num_threads in the cell; None: torch's default


@dataclass(frozen=True)
class Cell:
    """A variant (``name`` or ``peer:name``) on a preset with settings.

    ``settings`` keys: ``inner_steps``, ``meta_batch`` (run spec), ``depth``,
    ``width`` and any other ``model.<kw>`` (model constructor), ``task.<kw>``
    (task sampler).
    """

    variant: str
    preset: str
    device: str = "cpu"
    dtype: str = "float32"
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def peer(self) -> str | None:
        return self.variant.split(":", 1)[0] if ":" in self.variant else None

    @property
    def base_variant(self) -> str:
        return self.variant.split(":", 1)[1] if ":" in self.variant else self.variant

    def key(self) -> str:
        return json.dumps([self.variant, self.preset, self.device, self.dtype,
                           sorted(self.settings.items()), self.seed])

    def compare_key(self) -> str:
        """Identity across machines (no device): what ``compare`` matches on."""
        return json.dumps([self.variant, self.preset, self.dtype, sorted(self.settings.items()), self.seed])

    def label(self) -> str:
        s = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.variant} on {self.preset}" + (f" [{s}]" if s else "")

    def overrides(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(run-spec kwargs, model overrides, task overrides); the keys are harness.settings's one list."""
        spec, model, task, _ = split_settings(self.settings)  # variant settings: see variant_for
        return spec, model, task


def variant_for(cell: "Cell") -> Any:
    """The cell's variant with its variant-level settings (``step_ckpt``) applied."""
    from dataclasses import replace

    from harness.variants import get_variant

    variant = get_variant(cell.base_variant)
    if "step_ckpt" in cell.settings:
        n = int(cell.settings["step_ckpt"])
        if n < 0:
            raise ConfigError(f"step_ckpt must be >= 0 (0 = off), got {n}")
        variant = replace(variant, step_ckpt=n)
    return variant


# -- inside the cell's process -------------------------------------------------
def _builder(peer: str) -> Builder:
    for mod in filter(None, os.environ.get(PLUGIN_ENV, "").split(",")):
        importlib.import_module(mod.strip())
    if peer in BUILDERS:
        return BUILDERS[peer]
    peers = importlib.import_module("harness.studies.peers")  # ModuleNotFoundError -> unsupported
    return peers.build_peer


def peer_precheck(cell: Cell) -> str | None:
    """Why a ``higher:``/``torchopt:`` cell cannot run (peer not installed, or it cannot express the variant
    at the cell's precision), decided in the parent without a subprocess; ``None`` when it may run.

    Not installed wins (the reason names ``pip install '.[peers]'``).  Cells of other prefixes, or any cell
    when plugins are named in ``HARNESS_CELL_PLUGINS`` (a plugin may replace a peer's builder), return
    ``None``: the cell's own process decides.
    """
    if cell.peer is None or os.environ.get(PLUGIN_ENV) or cell.peer in BUILDERS:
        return None
    try:
        peers = importlib.import_module("harness.studies.peers")
    except ImportError:
        return None
    if cell.peer not in peers.PEERS:
        return None
    from harness.variants import get_variant

    present, why = peers.available(cell.peer)
    if not present:
        return why
    ok, reason = peers.supports(cell.peer, get_variant(cell.base_variant), str(cell.settings.get("amp", "off")))
    return None if ok else f"{peers.cell_name(cell.peer, cell.base_variant)} is unsupported: {reason}"


def run_cell_inline(cell: Cell, opts: MeasureOptions) -> dict[str, Any]:
    """Measure one cell in this process; never raises for a cell fault (the status says)."""
    import torch

    from harness import train as loop
    from harness.bench import measure
    from harness.reporting.provenance import environment

    row: dict[str, Any] = base_row(cell)
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        spec_kw, model_kw, task_kw = cell.overrides()
        variant = variant_for(cell)
        row["flags"] = variant.flags
        spec = loop.RunSpec(variant=cell.base_variant, preset=cell.preset, device=cell.device, dtype=cell.dtype,
                            seed=cell.seed, **spec_kw)
        exp = loop.Experiment(spec, variant=variant, model_overrides=model_kw or None,
                              task_overrides=task_kw or None)
        row["sizes"] = exp.sizes
        learner = exp.learner
        if cell.peer is not None:
            try:
                learner = _builder(cell.peer)(cell.peer, variant, exp)
            except ModuleNotFoundError as exc:
                raise _Unsupported(f"no learner builder for peer {cell.peer!r}: {exc}") from exc
            except ConfigError as exc:
                raise _Unsupported(str(exc)) from exc
        tasks = exp.sample()
        row["agreement"] = loop.check_agreement(exp, tasks, learner)
        scaler = exp.new_scaler() if hasattr(exp, "new_scaler") else None
        step = measure.StepRunner(learner, exp.sizes["outer_lr"], exp.sample, scaler=scaler)
        cap = int(opts.cpu_mem_cap_mib * measure.MIB) if opts.cpu_mem_cap_mib is not None else None
        m = measure.measure(step, cell.device, warmup=opts.warmup, repeats=opts.repeats, nvml=opts.nvml,
                            cap_bytes=cap)
        row["time"] = m.pop("time")
        row["memory"] = m
        row["losses"] = step.losses
        row["final_query_loss"] = step.losses[-1] if step.losses else None
        row["status"] = "ok"
        warn = measure.noise_warning(row["time"], cell.label())
        if warn:
            row["warnings"].append(warn)
    except _Unsupported as exc:
        row["status"], row["message"] = "unsupported", str(exc)
    except loop.Diverged as exc:
        row["status"], row["message"] = "diverged", str(exc)
    except MemoryError as exc:
        row["status"], row["message"] = "oom", f"MemoryError: {exc}"
    except Exception as exc:  # noqa: BLE001 -- a cell fault is a status, not a crash
        oom = getattr(torch.cuda, "OutOfMemoryError", None)
        if oom is not None and isinstance(exc, oom):
            row["status"], row["message"] = "oom", f"CUDA out of memory: {str(exc).splitlines()[0]}"
        else:
            row["status"], row["message"] = "error", f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=8)
    row["wall_s"] = time.perf_counter() - t0
    try:
        row["env"] = environment(cell.device if cell.device in ("cpu", "cuda") else None)
    except Exception as exc:  # noqa: BLE001
        row["env"] = {"error": str(exc)}
    return row


class _Unsupported(Exception):
    pass


def base_row(cell: Cell) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, "kind": "cell", "key": cell.key(), "variant": cell.variant,
            "base_variant": cell.base_variant, "peer": cell.peer, "flags": None, "preset": cell.preset,
            "device": cell.device, "dtype": cell.dtype, "settings": dict(cell.settings), "seed": cell.seed,
            "amp": str(cell.settings.get("amp", "off")),
            "status": "error", "message": None, "memory": {}, "time": {}, "agreement": {},
            "final_query_loss": None, "warnings": []}


def _child_main(argv: list[str]) -> int:
    cell_path, opts_path, out_path = argv
    cell_d = json.loads(Path(cell_path).read_text())
    cell = Cell(**cell_d)
    opts = MeasureOptions(**json.loads(Path(opts_path).read_text()))
    row = run_cell_inline(cell, opts)
    from harness.reporting.schema import write_json

    write_json(Path(out_path), row)
    return 0


# -- in the parent ------------------------------------------------------------------
def run_cell(cell: Cell, opts: MeasureOptions) -> dict[str, Any]:
    """Run one cell in a fresh subprocess with a time limit; always returns a row.

    A peer cell that cannot run (:func:`peer_precheck`) is recorded ``unsupported`` with its reason
    without starting a process.
    """
    try:
        why = peer_precheck(cell)
    except Exception:  # noqa: BLE001 -- e.g. an unknown variant: the cell's own process reports it
        why = None
    if why is not None:
        row = base_row(cell)
        try:
            from harness.variants import get_variant

            row["flags"] = get_variant(cell.base_variant).flags
        except Exception:  # noqa: BLE001
            pass
        row.update(status="unsupported", message=why, wall_s=0.0, env=_env(cell))
        return row
    with tempfile.TemporaryDirectory(prefix="harness-cell-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "cell.json").write_text(json.dumps(asdict(cell)))
        (tmpd / "opts.json").write_text(json.dumps(asdict(opts)))
        out = tmpd / "row.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", "harness.bench.cells", str(tmpd / "cell.json"), str(tmpd / "opts.json"), str(out)]
        t0 = time.perf_counter()
        with open(tmpd / "stderr.txt", "wb") as err:
            # its own process group, so a timeout also ends anything the cell started
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=str(REPO),
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=opts.timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                row = base_row(cell)
                row.update(status="timeout", message=f"cell exceeded its time limit of {opts.timeout_s:g} s",
                           wall_s=time.perf_counter() - t0, env=_env(cell))
                return row
            except BaseException:  # KeyboardInterrupt: do not leave the child behind
                _kill_group(proc)
                raise
        if rc == 0 and out.exists():
            return json.loads(out.read_text())
        tail = (tmpd / "stderr.txt").read_text(errors="replace").strip().splitlines()[-3:]
        row = base_row(cell)
        died = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        status = "oom" if rc == -9 else "error"  # SIGKILL without a timeout: most likely the kernel's OOM killer
        row.update(status=status, message=f"cell process {died}" + (f": {' | '.join(tail)}" if tail else ""),
                   wall_s=time.perf_counter() - t0, env=_env(cell))
        return row


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _env(cell: Cell) -> dict[str, Any]:
    from harness.reporting.provenance import environment

    return environment(cell.device)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``cells.jsonl`` (or a run directory); :class:`ResultsError` naming the file on bad input."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / "cells.jsonl"
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file (expected a run directory with cells.jsonl)")
    rows = []
    text = path.read_text(errors="replace")
    if text and not text.endswith("\n"):
        raise ResultsError(f"{path}: truncated (last line is incomplete)")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ResultsError(f"{path}: line {i} is not valid JSON (truncated or corrupted)") from None
        if not isinstance(row, dict) or row.get("schema") != SCHEMA_VERSION:
            got = row.get("schema") if isinstance(row, dict) else type(row).__name__
            raise ResultsError(f"{path}: line {i} has schema version {got!r}, expected {SCHEMA_VERSION}")
        for k in ("key", "variant", "status"):
            if k not in row:
                raise ResultsError(f"{path}: line {i} lacks field {k!r} (truncated or not a cells file)")
        rows.append(row)
    if not rows:
        raise ResultsError(f"{path}: empty results file")
    return rows


def run_matrix(cells: Iterable[Cell], run_dir: Path, opts: MeasureOptions | Callable[[Cell], MeasureOptions], *, force: bool = False,
               progress: bool = True, log: Callable[[str], None] | None = None,
               extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every cell not already in ``run_dir/cells.jsonl`` (all of them with ``force``), each isolated,
    rewriting the file atomically after each; returns all rows in matrix order."""
    from tqdm import tqdm

    cells = list(cells)
    run_dir = Path(run_dir)
    path = run_dir / "cells.jsonl"
    existing: dict[str, dict[str, Any]] = {}
    if path.exists():
        existing = {r["key"]: r for r in load_rows(path)}
    log = log or (lambda s: print(s, file=sys.stderr))
    def opts_of(cell: Cell) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(opts(cell) if callable(opts) else opts)))

    # finished = same cell key measured with the same options; other options re-measure the cell
    todo = [c for c in cells if force or c.key() not in existing
            or existing[c.key()].get("measure_opts") != opts_of(c)]
    skipped = len(cells) - len(todo)
    if skipped:
        log(f"resuming {run_dir}: skipping {skipped} finished cell(s), running {len(todo)} (--force re-runs all)")
    order = [c.key() for c in cells]
    rows = dict(existing)
    bar = tqdm(todo, desc=f"cells -> {run_dir.name}", unit="cell", file=sys.stderr, disable=None if progress else True)
    for cell in bar:
        bar.set_postfix_str(cell.variant)
        cell_opts = opts(cell) if callable(opts) else opts
        row = run_cell(cell, cell_opts)
        row["run_id"] = run_dir.name
        row["measure_opts"] = asdict(cell_opts)
        if extra:
            row.update(extra)
        rows[cell.key()] = row
        ordered = [rows[k] for k in order if k in rows] + [r for k, r in rows.items() if k not in order]
        write_jsonl(path, ordered)
        if row["status"] != "ok":
            bar.write(f"{cell.label()}: {row['status']}" + (f" ({row['message']})" if row.get("message") else ""))
        for w in row.get("warnings") or []:
            bar.write(w)
    bar.close()
    return [rows[k] for k in order if k in rows]


if __name__ == "__main__":  # run in the importable module, so BUILDERS registered by plugins are the ones used
    from harness.bench.cells import _child_main as _main

    raise SystemExit(_main(sys.argv[1:]))
