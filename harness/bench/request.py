"""A matrix as ``bench`` and ``sweep`` ask for it: the cells of checked options, run, reported, judged.

:func:`plan` turns checked options into cells (duplicates collapsed), :func:`run_request` runs
them through :func:`harness.bench.matrix.run_matrix`, rebuilds the tables and plots, and the
outcome's ``exit_code`` (:func:`harness.bench.matrix.matrix_exit_code`) says what the matrix means
for a script: 0 when every cell is ``ok`` or ``unsupported``, 1 when any failed, diverged, ran out
of memory, was killed or timed out.  Try: ``python -m harness bench --variants maml,ckpt_lr; echo $?``.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.bench.cells import BUILDERS, Cell, MeasureOptions, dedup_cells, load_cell_plugins, variant_for
from harness.bench.executors import ExecutorSpec, open_executor
from harness.bench.matrix import matrix_exit_code, run_matrix
from harness.core.config import ConfigError
from harness.reporting import tables
from harness.reporting.schema import CellRow
from harness.settings import DATA_SETTINGS, check_ranks
from harness.peers import PEERS, supports
from harness.variants import CANONICAL, get_variant, registry
from harness.zoo.presets import get_preset
from harness.zoo.user import UserSpecs, spec_name

__all__ = ["MatrixOutcome", "MatrixRequest", "add_peer_cells", "default_run_id", "plan", "resolve_variants", "run_request", "user_suffix"]



@dataclass(frozen=True)
class MatrixRequest:
    """Everything one matrix run needs, already checked."""

    cells: tuple[Cell, ...]
    run_dir: Path
    opts: MeasureOptions
    caps: dict[str, float] = field(default_factory=dict)  # variant -> CPU memory cap (MiB), a test hook
    force: bool = False
    plots_dir: Path | None = None  # None: no plots
    extra: dict[str, Any] | None = None  # CellRow fields written into every row (e.g. the swept parameter)
    executor: ExecutorSpec = ExecutorSpec()  # default: each cell in a local process


@dataclass(frozen=True)
class MatrixOutcome:
    rows: list[CellRow]
    summary: Path
    table: Path
    plots: list[Path]
    wall_s: float

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        return matrix_exit_code(self.rows)


def resolve_variants(text: str | None) -> list[str]:
    """``maml,ckpt_lr,higher:maml`` -> names; ``None``: every registered variant; ``''`` is an error."""
    load_cell_plugins()  # HARNESS_CELL_PLUGINS: they may register builders for more peer prefixes
    if text is None:
        return list(registry())
    names = [v.strip() for v in text.split(",") if v.strip()]  # repeated names: one cell (see plan)
    if not names:
        raise ConfigError(f"--variants is empty; valid variants: {', '.join(registry())}")
    peers = (*PEERS, *BUILDERS)
    for n in names:
        peer, sep, base = n.partition(":")  # as Cell.peer reads it
        if not sep:
            base = peer
        elif peer not in peers:
            raise ConfigError(f"unknown peer {peer!r} in {n!r}; valid peers: {', '.join(peers)} (as peer:variant)")
        get_variant(base)  # ConfigError listing the valid names
    return names


def add_peer_cells(variants: list[str]) -> list[str]:
    """``variants`` plus ``<peer>:<v>`` for every canonical ``v`` among them, and for any other ``v`` a peer
    can express (not duplicated)."""
    out = list(variants)
    for v in variants:
        if v in CANONICAL:
            out += [f"{p}:{v}" for p in PEERS if f"{p}:{v}" not in out]
        elif ":" not in v:  # beyond the canonical eight, only cells a peer can express (torch_maml:sckpt)
            out += [f"{p}:{v}" for p in PEERS if f"{p}:{v}" not in out and supports(p, get_variant(v))[0]]
    return out


def user_suffix(user: UserSpecs) -> str:
    """``-<factory>[-<sampler>][-ckpt_<patterns>]`` of a run of the user's code ('' for the preset's), folder-safe."""
    parts = [spec_name(user.model) if user.model else "", spec_name(user.tasks) if user.tasks else "",
             "ckpt_" + re.sub(r"[^A-Za-z0-9_+]", "_", "+".join(user.ckpt)) if user.ckpt else ""]
    return "".join(f"-{p}" for p in parts if p)


def default_run_id(preset: str, device: str, settings: dict[str, Any], user: UserSpecs = UserSpecs()) -> str:
    suffix = "".join(f"-{k.replace('.', '_')}{str(v).replace(',', '+')}" for k, v in sorted(settings.items())
                     if k not in DATA_SETTINGS)  # where the data set lives does not name the run (a path)
    return f"{preset}{user_suffix(user)}-{device}{suffix}"


def plan(variants: list[str], preset: str, device: str, dtype: str, seed: int, settings: dict[str, Any],
         amps: list[str] = ["off"], sweep: tuple[str, list[Any]] | None = None,  # noqa: B006
         user: UserSpecs = UserSpecs()) -> tuple[Cell, ...]:
    """The cells, precision-major then variant (bench) or variant-major then value (sweep); each cell once
    however often a variant or value is repeated (``--variants maml,maml`` is one cell).  ``user``: the
    ``--model``/``--tasks``/``--ckpt`` every cell carries."""
    def cell(v: str, amp: str, extra: dict[str, Any]) -> Cell:
        s = {**settings, **extra, **({"amp": amp} if amp != "off" else {})}
        return Cell(v, preset, device, dtype, s, seed, **user.fields())

    if sweep is None:
        cells = [cell(v, a, {}) for a in amps for v in variants]
    else:
        name, values = sweep
        cells = [cell(v, a, {name: x}) for a in amps for v in variants for x in values]
    for c in cells:  # a setting the variant cannot take (vmap_chunk without vectorize, ...) is bad input
        try:
            if "ranks" in c.settings:  # every rank needs a task (a swept ranks or meta_batch too)
                check_ranks(c.settings["ranks"], int(c.settings.get("meta_batch", get_preset(c.preset).meta_batch)))
            if c.peer is None:
                variant_for(c).config()
        except ConfigError as exc:
            raise ConfigError(f"{c.label()}: {exc}") from None
    return tuple(dedup_cells(cells))


def run_request(req: MatrixRequest) -> MatrixOutcome:
    """Run the cells not already measured, then rebuild ``summary.csv``, ``table.md`` and the plots."""
    t0 = time.perf_counter()
    opts = (lambda c: replace(req.opts, cpu_mem_cap_mib=req.caps.get(c.variant))) if req.caps else req.opts
    with open_executor(req.executor) as executor:
        rows = run_matrix(req.cells, req.run_dir, opts, force=req.force, extra=req.extra, executor=executor)
    built = tables.build(req.run_dir, plots=req.plots_dir is not None, plots_dir=req.plots_dir)
    return MatrixOutcome(rows, built["summary"], built["table"], built["plots"], time.perf_counter() - t0)
