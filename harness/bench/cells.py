"""A cell: one (variant x preset x settings) measurement, and what makes two cells the same one.

A cell's identity (:meth:`Cell.key`) is what changes its measurement: variant, preset, device, dtype,
settings and seed, and the user's ``--model``/``--tasks``/``--ckpt`` when given (so a resumed run never takes a
user model's cell for the preset's).  How long it may take (``MeasureOptions.timeout_s``) is not part of it, so changing
only ``--timeout`` on a re-run resumes (``harness.bench.matrix``).  The statuses a cell's row can have:

* ``ok`` -- measured;
* ``oom`` -- out of memory: ``torch.cuda.OutOfMemoryError``, a CPU ``MemoryError`` or ``std::bad_alloc``
  (a failed huge allocation), or the CPU tracker's memory cap (``--cpu-mem-cap``);
* ``killed`` -- the cell's process was killed by a signal from outside the harness (a user, the kernel's
  OOM killer: the message names the signal);
* ``timeout`` -- the per-cell time limit passed and the harness killed the process;
* ``diverged`` -- the meta-loss became NaN/inf;
* ``unsupported`` -- a peer cell the peer cannot express (or not installed), or a variant that refuses the
  cell's model (a ``ConfigError`` while it is built or run, e.g. ``vmaml`` on BatchNorm; reason in ``message``);
* ``error`` -- anything else (exception type and message in ``message``, traceback kept).

Try it: ``python -m harness bench --variants maml,fo --run-id try`` (``results/try/cells.jsonl``).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from harness.core.config import ConfigError
from harness.loop.spec import RunSpec
from harness.reporting.versions import ResultsError  # noqa: F401 -- kept importable here
from harness.reporting.schema import CellRow
from harness.settings import (LAUNCH_SETTINGS, MODEL_SETTINGS, SPEC_SETTINGS, SWEEP_PARAMS,  # the one list of keys
                              VARIANT_SETTINGS, parse_value, split_settings)
from harness.variants import Variant
from harness.zoo.user import UserSpecs, spec_name

__all__ = ["ADDED_LATER", "Cell", "MeasureOptions", "STATUSES", "PASSING_STATUSES", "SPEC_SETTINGS", "MODEL_SETTINGS",
           "VARIANT_SETTINGS", "LAUNCH_SETTINGS", "SWEEP_PARAMS", "base_row", "parse_value", "variant_for",
           "dedup_cells",
           "BUILDERS", "Builder", "PLUGIN_ENV", "ResultsError", "load_cell_plugins"]

STATUSES = ("ok", "oom", "killed", "error", "timeout", "diverged", "unsupported")
PASSING_STATUSES = ("ok", "unsupported")  # a matrix of only these exits 0 (see matrix.matrix_exit_code)

# Learner builders for ``peer:variant`` cells: prefix -> fn(peer, variant, exp) returning an object with
# ``meta_gradients(tasks)``, ``step(tasks)`` and ``parameters()``; a prefix not registered here falls back to
# ``harness.peers.build_peer``.  A cell runs in a fresh process, so register at import of a module
# named in ``HARNESS_CELL_PLUGINS`` (comma separated).
PLUGIN_ENV = "HARNESS_CELL_PLUGINS"
ADDED_LATER = {"fd_directions": 0}  # MeasureOptions fields newer than the stored rows, at their default
Builder = Callable[[str, Any, Any], Any]
BUILDERS: dict[str, Builder] = {}


def load_cell_plugins() -> None:
    """Import every module named in ``HARNESS_CELL_PLUGINS`` (each registers its builders); one that does not
    import is a ConfigError naming it (the driver calls this before anything is written; so does each cell)."""
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 -- whatever the plugin raises, one line naming it
            text = str(exc).strip().splitlines()
            raise ConfigError(f"{PLUGIN_ENV} names module {name!r}, which cannot be imported "
                              f"({type(exc).__name__}: {text[0] if text else ''}); expected comma-separated "
                              "importable module names, or leave it unset") from None


@dataclass(frozen=True)
class MeasureOptions:
    """How a cell is measured.  ``timeout_s`` bounds the run but does not change the measurement."""

    warmup: int = 1
    repeats: int = 5
    timeout_s: float = 300.0
    nvml: bool = True
    cpu_mem_cap_mib: float | None = None
    threads: int | None = None  # torch.set_num_threads in the cell; None: torch's default
    pairs: int | None = None  # alternating pairs for the paired ratio; None: harness.bench.paired.DEFAULT_PAIRS
    fd_directions: int = 0  # check: finite-difference directions of second-order cells (harness.gradcheck); 0: none

    def identity(self) -> dict[str, Any]:
        """The options that change the measurement (everything but the time limit), as stored in rows."""
        return MeasureOptions.identity_of({k: getattr(self, k) for k in self.__dataclass_fields__})

    @staticmethod
    def identity_of(stored: dict[str, Any]) -> dict[str, Any]:
        """A row's ``measure_opts`` as :meth:`identity` has it: no time limit, and options added later left out
        at their default (a row measured before they existed is the same measurement)."""
        d = {k: v for k, v in stored.items() if k != "timeout_s" and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return json.loads(json.dumps(d))


@dataclass(frozen=True)
class Cell:
    """A variant (``name`` or ``peer:name``) on a preset with settings.

    ``settings``: ``--set`` keys as parsed by :func:`harness.settings.keys.parse_settings` (the one list of them
    is ``SETTING_KEYS`` there, plus ``model.<kw>`` and ``task.<kw>``); :meth:`run_spec` splits them by
    destination (:func:`harness.settings.keys.split_settings`).
    """

    variant: str
    preset: str
    device: str = "cpu"
    dtype: str = "float32"
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    model: str | None = None  # --model spec (harness.zoo.user); None: the preset's model
    tasks: str | None = None  # --tasks spec; None: the preset's tasks
    ckpt: tuple[str, ...] = ()  # --ckpt patterns (MetaConfig.ckpt_modules)
    # --memory-budget: the driver's plan (harness.bench.planner.MemoryPlan.to_json), applied by the cell's process
    # as it is; not part of the cell's identity (the budget, in settings, is)
    memory_plan: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ckpt", tuple(self.ckpt))  # a list when read back from JSON

    def user(self) -> dict[str, Any]:
        """The user's model, tasks and checkpoint patterns that the cell names (none: the preset's)."""
        return UserSpecs(self.model, self.tasks, self.ckpt).fields()

    @property
    def peer(self) -> str | None:
        return self.variant.split(":", 1)[0] if ":" in self.variant else None

    @property
    def base_variant(self) -> str:
        return self.variant.split(":", 1)[1] if ":" in self.variant else self.variant

    def _user_identity(self) -> list[Any]:
        """``[]`` for a preset's model and tasks, so the keys of every cell measured before issue 21 stay."""
        return [sorted((k, list(v) if k == "ckpt" else v) for k, v in self.user().items())] if self.user() else []

    def key(self) -> str:
        """Identity within a run: two cells with the same key are one measurement."""
        return json.dumps([self.variant, self.preset, self.device, self.dtype,
                           sorted(self.settings.items()), self.seed, *self._user_identity()])

    def compare_key(self) -> str:
        """Identity across machines (no device, no ``ranks``): what ``compare`` matches on, so 1 and N ranks pair up."""
        settings = sorted((k, v) for k, v in self.settings.items() if k not in LAUNCH_SETTINGS)
        return json.dumps([self.variant, self.preset, self.dtype, settings, self.seed, *self._user_identity()])

    def label(self) -> str:
        s = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        user = ", ".join(f"{k} {spec_name(v) if k != 'ckpt' else ','.join(v)}" for k, v in self.user().items())
        return f"{self.variant} on {self.preset}" + (f" ({user})" if user else "") + (f" [{s}]" if s else "")

    def run_spec(self) -> RunSpec:
        """The cell as the one spec a run is built from (settings split by destination, checked, typed), made
        where the cell runs from the JSON the driver wrote: the child, the paired reference, the plan check."""
        spec, _, _, _, _ = parts = split_settings(self.settings)
        return RunSpec(variant=self.base_variant, preset=self.preset, device=self.device, dtype=self.dtype,
                       seed=self.seed, **spec, **self.user(), settings=parts)


def dedup_cells(cells: list[Cell]) -> list[Cell]:
    """The cells with duplicates (same :meth:`Cell.key`) collapsed, first occurrence's order kept."""
    unique: dict[str, Cell] = {}
    for c in cells:
        unique.setdefault(c.key(), c)
    return list(unique.values())


def variant_for(cell: Cell) -> Variant:
    """The cell's variant with its variant-level settings (``step_ckpt``, ``step_rebuild``, ``snapshots``,
    ``vectorize``, ``vmap_chunk``) applied."""
    return cell.run_spec().variant_obj


def base_row(cell: Cell) -> CellRow:
    """A cell's row before it ran: status ``error`` until something says otherwise (``dataclasses.replace``
    fills in the rest)."""
    return CellRow(key=cell.key(), variant=cell.variant, base_variant=cell.base_variant, peer=cell.peer,
                   preset=cell.preset, device=cell.device, dtype=cell.dtype, settings=dict(cell.settings),
                   seed=cell.seed, amp=str(cell.settings.get("amp", "off")), model=cell.model, tasks=cell.tasks,
                   ckpt=list(cell.ckpt) or None)
