"""Result rows as dataclasses with one schema version: the one place that says what a result file holds.

Every result the harness writes is one of the row types below, stamped with :data:`SCHEMA_VERSION`
and a ``kind``: a bench/sweep cell (:class:`CellRow`, one line of ``results/<run-id>/cells.jsonl``),
a ``run`` result (:class:`RunResult`, ``results/runs/*.json``), the diagnosis (:class:`DiagnosisResult`,
``results/diagnosis*.json``), an ablation cell (:class:`AblationCell`, ``results/<run-id>/cells/*.json``)
and the ablation's summary (:class:`AblationSummary`, ``results/<run-id>/summary.json``), and the 1 vs N
ranks measurement (:class:`ScalingResult`, ``results/<run-id>/scaling.json``).  A new row shape: one
more :class:`Row` subclass with a ``KIND`` and its fields, in :data:`ROW_TYPES`.  Every writer and reader
goes through these types: :mod:`harness.reporting.files` writes them (validated, atomically) and reads them.

Reading first brings an older row up to :data:`SCHEMA_VERSION` (:func:`harness.reporting.versions.migrate`),
then validates the field types from the dataclass annotations: a file that is truncated, of another schema or
malformed (``"memory": "lots"``) is a :class:`ResultsError` naming file and line (exit 2).
A figure (a float field, an entry of a ``list[float]`` field, or a figure-dict entry ending in ``_mib``,
``_ms``, ``_err``, ``_cosine``, ``_loss``) is a number, ``None`` (not measured) or NaN/inf (stored as
``"nan"``/``"inf"``: JSON has none).  Nested structures (``dict``/``list`` fields) are kept as written.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, TypeVar, Union

from harness.reporting.versions import MIGRATIONS, SCHEMA_VERSION, ResultsError, migrate, readable_versions

FIGURE_SUFFIXES = ("_mib", "_ms", "_err", "_cosine", "_loss")
Figure = Optional[float]  # a measured number; None: not measured; NaN/inf allowed
R = TypeVar("R", bound="Row")
NONFINITE = ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _figure(value: Any, where: str, name: str) -> Any:
    """A figure as read: a number (ints stay ints), None, or NaN/inf from their string form."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().lower() in NONFINITE:
        return float(value)
    raise ResultsError(f"{where}: field {name!r} must be a number, null or \"nan\", got {type(value).__name__} "
                       f"{value!r}")


def _figures(value: Any, where: str, name: str) -> dict[str, Any]:
    """A figure dict (memory, time, agreement): entries named like figures must be figures."""
    if not isinstance(value, dict):
        raise ResultsError(f"{where}: field {name!r} must be an object, got {type(value).__name__} {value!r}")
    return {k: _figure(v, where, f"{name}.{k}") if k.endswith(FIGURE_SUFFIXES) else v for k, v in value.items()}


_SIMPLE = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object", list: "a list"}


def _conforms(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    base = origin or tp
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _figure_list(tp: Any) -> bool:
    """``list[float]`` or ``list[Figure]`` (possibly Optional): a list whose entries are figures."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return any(typing.get_origin(a) is list and typing.get_args(a) in ((float,), (Figure,)) for a in args)


def _describe(tp: Any) -> str:
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return " or ".join("null" if a is type(None) else _SIMPLE.get(typing.get_origin(a) or a, str(a)) for a in args)


@dataclass
class Row:
    """Base of every row type: typed fields, ``to_dict``/``from_dict`` with validation.

    Fields with ``metadata={"optional": True}`` are left out of the file when ``None`` (they are absent
    from rows that never got that far, e.g. ``losses`` of a failed cell); keys the type does not know are
    kept in ``extra`` and written back unchanged, so no information is lost on a round trip.
    """

    KIND: ClassVar[str] = ""
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.metadata.get("optional"):
                continue
            out[f.name] = v
        out.update(getattr(self, "extra", {}) or {})
        return out

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "row") -> R:
        """Validate ``data`` against the field annotations; :class:`ResultsError` naming ``where``."""
        if not isinstance(data, dict):
            raise ResultsError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = migrate(data, where)
        if data.get("kind", cls.KIND) != cls.KIND:
            raise ResultsError(f"{where}: kind {data.get('kind')!r}, expected {cls.KIND!r}")
        for k in cls.REQUIRED:
            if k not in data:
                raise ResultsError(f"{where} lacks field {k!r} (truncated or not a {cls.KIND} file)")
        hints = typing.get_type_hints(cls)
        kw: dict[str, Any] = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in data.items():
            f = names.get(k)
            if f is None or k == "extra":
                continue
            if f.metadata.get("figures"):
                v = _figures(v, where, k)
            elif hints[k] in (Figure, float):  # any float field may hold NaN/inf (stored as strings)
                v = _figure(v, where, k)
            elif isinstance(v, list) and _figure_list(hints[k]):  # so may the entries of a list of floats
                v = [_figure(x, where, f"{k}[{i}]") for i, x in enumerate(v)]
            elif not _conforms(v, hints[k]):
                raise ResultsError(f"{where}: field {k!r} must be {_describe(hints[k])}, "
                                   f"got {type(v).__name__} {v!r}")
            kw[k] = v
        if "extra" in names:
            kw["extra"] = {k: v for k, v in data.items() if k not in names}
        return cls(**kw)


def _figures_field() -> Any:
    return field(default_factory=dict, metadata={"figures": True})


def _opt(default: Any = None) -> Any:
    return field(default=default, metadata={"optional": True})


@dataclass
class CellRow(Row):
    """One bench/sweep cell (``harness.bench.cells``): identity, status, figures, provenance."""

    KIND: ClassVar[str] = "cell"
    REQUIRED: ClassVar[tuple[str, ...]] = ("key", "variant", "status")

    key: str = ""
    variant: str = ""
    schema: int = SCHEMA_VERSION
    kind: str = "cell"
    base_variant: Optional[str] = None
    peer: Optional[str] = None
    flags: Optional[dict] = None
    preset: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    settings: dict = field(default_factory=dict)
    seed: int = 0
    amp: str = "off"
    status: str = "error"
    message: Optional[str] = None
    memory: dict = _figures_field()
    time: dict = _figures_field()
    agreement: dict = _figures_field()
    final_query_loss: Figure = None
    warnings: list = field(default_factory=list)
    paired: Optional[dict] = _opt()  # time / reference from alternating pairs (harness.bench.paired)
    sizes: Optional[dict] = _opt()
    losses: Optional[list] = _opt()
    traceback: Optional[str] = _opt()
    wall_s: Optional[float] = _opt()
    env: Optional[dict] = _opt()
    run_id: Optional[str] = _opt()
    measure_opts: Optional[dict] = _opt()
    sweep_param: Optional[str] = _opt()
    model: Optional[str] = _opt()  # --model pkg.module:factory / file.py:factory (harness.zoo.user); absent: preset's
    tasks: Optional[str] = _opt()  # --tasks ...:sampler; absent: the preset's tasks
    ckpt: Optional[list] = _opt()  # --ckpt patterns (MetaConfig.ckpt_modules)
    fd_rel_err: Figure = _opt()  # `check`: finite differences vs the meta-gradient (harness.gradcheck)
    distributed: Optional[dict] = _opt()  # the ranks' summary (harness.loop.distributed); absent: no process ran
    plan: Optional[str] = _opt()  # --memory-budget: the configuration the planner chose (harness.bench.planner)
    predicted_peak_mib: Figure = _opt()  # --memory-budget: its predicted peak (measured: memory.cpu_peak_alloc_mib)
    # an approximate estimator vs the exact meta-gradient: w_/lr_ rel_err and cosine, cg_residual (loop.agreement)
    fidelity: Optional[dict] = field(default=None, metadata={"optional": True, "figures": True})
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # on-disk order of the columns as before the dataclass: schema, kind, key, variant, ...
        d = super().to_dict()
        head = ("schema", "kind", "key", "variant")
        return {**{k: d[k] for k in head}, **{k: v for k, v in d.items() if k not in head}}


@dataclass
class RunResult(Row):
    """``python -m harness run``'s result: the spec, the agreement check, the training curve, figures."""

    KIND: ClassVar[str] = "run"
    REQUIRED: ClassVar[tuple[str, ...]] = ("status", "spec")

    schema: int = SCHEMA_VERSION
    kind: str = "run"
    status: str = "ok"
    message: Optional[str] = None
    spec: dict = field(default_factory=dict)
    variant: dict = field(default_factory=dict)
    agreement: dict = _figures_field()
    query_loss: list = field(default_factory=list)
    final_query_loss: Figure = None
    skipped_steps: int = 0
    wall_s: Figure = None
    memory: dict = _figures_field()
    time: dict = _figures_field()
    env: dict = field(default_factory=dict)
    model: Optional[str] = _opt()  # as CellRow: the user's --model, --tasks, --ckpt when given
    tasks: Optional[str] = _opt()
    ckpt: Optional[list] = _opt()
    settings: dict = field(default_factory=dict)  # the --set settings, as `key=value` names them
    distributed: Optional[dict] = _opt()  # the ranks' summary (harness.loop.distributed)
    plan: Optional[str] = _opt()  # as CellRow: --memory-budget's chosen configuration and predicted peak
    predicted_peak_mib: Figure = _opt()
    fidelity: Optional[dict] = field(default=None, metadata={"optional": True, "figures": True})  # as CellRow
    extra: dict = field(default_factory=dict)


@dataclass
class DiagnosisResult(Row):
    """``python -m harness diagnose``'s result: the engines x variants table, the expectations, probes."""

    KIND: ClassVar[str] = "diagnosis"
    REQUIRED: ClassVar[tuple[str, ...]] = ("table",)

    schema: int = SCHEMA_VERSION
    kind: str = "diagnosis"
    command: str = ""
    amp: str = "off"
    setup: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: Optional[str] = _opt()
    tolerance: Optional[float] = _opt()
    table: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)
    differences: list = field(default_factory=list)
    probes: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class AblationCell(Row):
    """One ablation cell, ``results/<run-id>/cells/<variant>_s<seed>.json``: a (variant, seed) meta-trained and
    evaluated on held-out tasks (``harness.studies.ablation.run.run_cell``), reused on a rerun when its ``spec``
    is the ablation's fingerprint.  Cells written before the one :data:`SCHEMA_VERSION` (``"schema": 2``)
    no longer read: ``ablate`` recomputes them."""

    KIND: ClassVar[str] = "ablation-cell"
    REQUIRED: ClassVar[tuple[str, ...]] = ("status", "variant", "seed", "spec", "sizes", "train_loss", "curve_steps",
                                           "curve_test_loss", "curve_test_acc", "test_loss", "test_acc",
                                           "learned_lrs", "wall_s", "cpu_s")

    schema: int = SCHEMA_VERSION
    kind: str = "ablation-cell"
    status: str = "ok"  # ok, diverged, or error (its Ray worker died)
    message: Optional[str] = None
    variant: dict = field(default_factory=dict)  # {"name": ..., **flags}
    seed: int = 0
    spec: dict = field(default_factory=dict)  # AblationSpec.fingerprint()
    sizes: dict = field(default_factory=dict)
    train_loss: list[float] = field(default_factory=list)  # per meta-step
    curve_steps: list[int] = field(default_factory=list)  # the meta-test curve: after these meta-steps ...
    curve_test_loss: list[float] = field(default_factory=list)  # ... the mean held-out query loss
    curve_test_acc: Optional[list[Figure]] = None  # classification only
    test_loss: list[float] = field(default_factory=list)  # per held-out task after training; [] if diverged
    test_acc: Optional[list[float]] = None
    learned_lrs: Optional[dict] = None  # mean learned inner LR per parameter
    wall_s: float = 0.0
    cpu_s: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class AblationSummary(Row):
    """``python -m harness ablate``'s ``results/<run-id>/summary.json``: the variant rows, effects and checkpoint
    checks (``harness.studies.ablation.summary``), the configuration, timings and provenance.  ``curves``
    (what the plots draw) is kept in memory only: the cells hold them."""

    KIND: ClassVar[str] = "ablation"
    REQUIRED: ClassVar[tuple[str, ...]] = ("run_id", "rows", "effects", "checks", "config")

    # on-disk order as before the dataclass: the statistics first, then schema, kind and the run
    classification: bool = False
    rows: list = field(default_factory=list)
    effects: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    curves: Optional[dict] = _opt()
    correction: str = "holm"
    alpha: float = 0.05
    bootstrap_resamples: int = 0
    all_identical: bool = False
    schema: int = SCHEMA_VERSION
    kind: str = "ablation"
    run_id: str = ""
    command: str = ""
    config: dict = field(default_factory=dict)
    trained_cells: int = 0
    reused_cells: int = 0
    train_wall_s: float = 0.0
    cells_wall_s: float = 0.0
    cells_cpu_s: float = 0.0
    env: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class ScalingResult(Row):
    """``python -m harness scaling``'s ``results/<run-id>/scaling.json`` (``harness.bench.scaling``): 1 vs N data-parallel
    ranks in ABAB pairs; ``runs`` holds each pair's two ``run`` rows and its speed-up, ``summary`` their spread."""

    KIND: ClassVar[str] = "scaling"
    REQUIRED: ClassVar[tuple[str, ...]] = ("ranks", "pairs", "summary", "runs")

    schema: int = SCHEMA_VERSION
    kind: str = "scaling"
    ranks: int = 2
    pairs: int = 0
    run_args: list[str] = field(default_factory=list)  # of every `python -m harness run`
    threads_per_rank: int = 1
    sample_meta_batch_ms: Figure = None
    summary: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)  # per pair: {"one": run row, "many": run row, "speedup": ratio}
    env: dict = field(default_factory=dict)
    command: str = ""
    extra: dict = field(default_factory=dict)


# kind -> row type: every result shape the harness writes (a new one: a Row subclass, added here)
ROW_TYPES: dict[str, type[Row]] = {t.KIND: t for t in (CellRow, RunResult, DiagnosisResult, AblationCell,
                                                        AblationSummary, ScalingResult)}


__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "readable_versions", "migrate", "Figure", "ResultsError", "Row", "CellRow",
           "RunResult", "DiagnosisResult",
           "AblationCell", "AblationSummary", "ScalingResult", "ROW_TYPES"]
