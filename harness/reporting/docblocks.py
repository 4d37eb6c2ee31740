"""Tables in the README and docs that quote committed results, rewritten from those results.

A quoted table sits between two markers that name what it is and where it comes from::

    <!-- generated: variants results/cpu-bench-peers -->
    | variant | peak MiB | ... |
    <!-- end generated -->

``python -m harness docs`` rewrites every block of ``README.md`` and ``docs/*.md`` from the committed
files; ``python -m harness docs --check`` only says which blocks drifted (exit 1), as the test suite does.
Kinds (:data:`KINDS`):

* ``variants RUN`` -- our variants of a bench run at fp32: peak memory, ratio to ``maml``, median time,
  gradient errors (from ``RUN/cells.jsonl``);
* ``sweep-memory RUN`` -- a sweep's peak memory as a pivot (swept value x variant) with the last variant
  over the first;
* ``diagnosis FILE.json`` -- the diagnosis table, each cell shortened (``wrong (w 0.39)``,
  ``raises RuntimeError (in-place; ...)``, ``[vs float64: ...]`` under mixed precision);
* ``cells RUN [a,b,...]`` -- chosen cells of a bench run (ours or peers', in the order named; all when
  none are named): status, peak memory, median time, the paired ratio, gradient error;
* ``paired-stability RUN_A RUN_B`` -- each cell's paired ratio in two runs of the same matrix (e.g. one on a
  quiet machine, one under extra load) and how far the second moved from the first;
* ``scaling FILE.json`` -- 1 vs N data-parallel ranks (``python -m harness scaling``): times, the per-pair
  speed-up, the all-reduce, sampling and memory figures;
* ``check RUN`` -- the verdict of every variant of a ``python -m harness check`` run (exact / refused / WRONG /
  FAILED, with the errors, peak memory and time), as the command prints it.
* ``md-table FILE.md N`` -- the N-th Markdown table of a committed Markdown result, verbatim.
* ``horizon RUN memory|time|planner|targets`` -- an ``inner_steps`` sweep with several schedules per variant (the
  long-horizon run, ``make horizon``): peak MiB per K and schedule; the paired time against the cells' common
  reference and against ``sckpt_lr``; the planner's cells (budget, plan, predicted and measured peak); issue 22's Done-when figures.
* ``fidelity RUN`` -- an estimator run (issue 23): each estimator's cosine and relative error against the exact
  meta-gradient per K, the CG residual, peak memory against ``maml``'s and the paired time.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd

from harness.core.config import ConfigError
from harness.reporting.files import read_cells, read_row, write_atomic
from harness.reporting.frame import cells_frame, num
from harness.reporting.horizon_tables import horizon_table
from harness.reporting.render import fixed, fmt, fmt_ratio, markdown_rows, markdown_table, paired_text, percent, times
from harness.reporting.schema import DiagnosisResult, ResultsError, ScalingResult
from harness.reporting.verdicts import verdicts

START = re.compile(r"^<!-- generated:(?P<spec>[^>]*)-->$")
END = "<!-- end generated -->"
ENGINE_HEADS = {"seed_reentrant": "seed + reentrant ckpt", "seed_non_reentrant": "seed + non-reentrant ckpt",
                "functional": "functional engine"}


class Block(NamedTuple):
    """One generated block: where it is (file, 1-based line of its start marker), what it is, its body."""

    path: Path
    line: int
    kind: str
    args: tuple[str, ...]
    start: int  # index of the start marker in the file's lines
    end: int  # index of the end marker
    body: str


def find_blocks(text: str, path: Path) -> list[Block]:
    """The generated blocks of a file; :class:`ConfigError` naming file and line for an unclosed or
    nested marker or one without a kind."""
    lines = text.split("\n")
    blocks, open_at = [], None
    for i, line in enumerate(lines):
        m = START.match(line.strip())
        if m:
            if open_at is not None:
                raise ConfigError(f"{path}:{i + 1}: generated block inside the block opened at line {open_at + 1}")
            open_at = i
        elif line.strip() == END:
            if open_at is None:
                raise ConfigError(f"{path}:{i + 1}: '{END}' without a start marker")
            spec = START.match(lines[open_at].strip())["spec"].split()
            if not spec:
                raise ConfigError(f"{path}:{open_at + 1}: generated block without a kind; kinds: {', '.join(KINDS)}")
            blocks.append(Block(path, open_at + 1, spec[0], tuple(spec[1:]), open_at, i,
                                "\n".join(lines[open_at + 1:i])))
            open_at = None
    if open_at is not None:
        raise ConfigError(f"{path}:{open_at + 1}: generated block has no '{END}'")
    return blocks


def _cell_columns(rows: pd.DataFrame, first: str, *, vs_maml: bool, lr_err: bool) -> pd.DataFrame:
    """The columns the ``variants`` and ``cells`` blocks share, from :func:`cells_frame` rows."""
    cols = {first: rows["variant"].map(lambda v: f"`{v}`"), "status": rows["status"],
            "peak MiB": rows["mem_mib"].map(fmt)}
    if vs_maml:
        cols["mem / maml"] = rows["mem_vs_maml"].map(fmt_ratio)
    cols["median ms"] = rows["time_median_ms"].map(lambda v: fmt(v, 3))
    cols["time / ref (paired, IQR)"] = rows["time_vs_ref_paired_text"].fillna("")  # same process, alternating
    cols["w rel err"] = rows["w_rel_err"].map(lambda v: fmt(v, 2))
    if lr_err:
        cols["lr rel err"] = rows["lr_rel_err"].map(lambda v: fmt(v, 2))
    return pd.DataFrame(cols)


def variants_table(root: Path, run: str) -> list[str]:
    frame = cells_frame(read_cells(root / run))
    ours = frame[frame["peer"].isna() & (frame["amp"] == "off")]
    return markdown_table(_cell_columns(ours, "variant", vs_maml=True, lr_err=True))


def cells_table(root: Path, run: str, names: str = "") -> list[str]:
    frame = cells_frame(read_cells(root / run)).set_index("variant", drop=False)
    wanted = list(dict.fromkeys(n for n in names.split(",") if n))
    missing = [n for n in wanted if n not in frame.index]
    if missing:
        raise ResultsError(f"{root / run}: no cell {', '.join(missing)}; cells: {', '.join(frame.index)}")
    rows = frame.loc[wanted] if wanted else frame  # every cell once, in the run's order, when none are named
    return markdown_table(_cell_columns(rows, "cell", vs_maml=False, lr_err=False))


def paired_stability_table(root: Path, run_a: str, run_b: str) -> list[str]:
    a, b = ({r.variant: r for r in read_cells(root / run) if num((r.paired or {}).get("median")) is not None}
            for run in (run_a, run_b))
    body, moves = [], []
    for name in [v for v in a if v in b]:
        pa, pb = a[name].paired, b[name].paired
        move = pb["median"] / pa["median"] - 1
        moves.append(abs(move))
        body.append([f"`{name}`", f"`{pa['reference']}`", pa.get("clock", "wall"),
                     paired_text(pa, reference=False), paired_text(pb, reference=False), percent(move, signed=True)])
    if not body:
        raise ResultsError(f"{root / run_a} and {root / run_b}: no cell with a paired ratio in both")
    within = sum(m <= 0.10 for m in moves)
    body.append([f"**{len(moves)} cells**", "", "", "", "", f"**{within} within ±10%, largest {percent(max(moves))}**"])
    return markdown_rows(["cell", "reference", "clock", f"paired ({run_a})", f"paired ({run_b})", "moved"], body)


def scaling_table(root: Path, source: str) -> list[str]:
    result = read_row(root / source, ScalingResult)
    s, n, k = result.summary, result.ranks, result.pairs
    per_rank = " / ".join(fmt(m, 4) for m in s["rank_memory_mib"])
    return markdown_rows(["", "median", "spread"], [
        ["time per meta-step, 1 rank", f"{fixed(s['one_rank_ms_median'], 0)} ms",
         f"IQR {fixed(s['one_rank_ms_iqr'], 0)} ms over {k} runs"],
        [f"time per meta-step, {n} ranks", f"{fixed(s['many_ranks_ms_median'], 0)} ms",
         f"IQR {fixed(s['many_ranks_ms_iqr'], 0)} ms over {k} runs"],
        [f"**speed-up per pair (1 rank / {n} ranks)**", f"**{times(s['speedup_median'])}**",
         f"IQR {fixed(s['speedup_iqr'], 2)}, range {times(s['speedup_min'])} to {times(s['speedup_max'])}"],
        ["all-reduce per meta-step (incl. waiting for the other ranks), per rank",
         " / ".join(fixed(ms, 0) for ms in s["rank_reduce_median_ms"]) + " ms", "median over pairs"],
        ["drawing one full meta-batch (each rank repeats it)", f"{fixed(result.sample_meta_batch_ms, 2)} ms", "median of 20"],
        ["deterministic CPU memory peak (`cpu_peak_alloc_mib`), 1 process", f"{fmt(s['one_rank_memory_mib'], 4)} MiB", ""],
        [f"the same, per rank with {n} ranks", f"{per_rank} MiB", ""],
    ])


def sweep_memory_table(root: Path, run: str) -> list[str]:
    rows = read_cells(root / run)
    param = next((r.sweep_param for r in rows if r.sweep_param), None)
    if param is None:
        raise ResultsError(f"{root / run}: not a sweep (no sweep_param in its rows)")
    frame = cells_frame(rows)
    frame[param] = [r.settings.get(param) for r in rows]
    pivot = frame.pivot_table(index=param, columns="variant", values="mem_mib", aggfunc="first", sort=False)
    variants = [v for v in dict.fromkeys(frame["variant"]) if v in pivot.columns]
    pivot = pivot.reindex(columns=variants).sort_index()
    first, last = variants[0], variants[-1]
    body = [[str(k), *(fmt(pivot.at[k, v]) if pd.notna(pivot.at[k, v]) else "—" for v in variants),
             fmt_ratio(pivot.at[k, last] / pivot.at[k, first])] for k in pivot.index]
    return markdown_rows([param, *(f"`{v}`" for v in variants), f"`{last}` / `{first}`"], body)


def fidelity_table(root: Path, run: str) -> list[str]:
    """An estimator run (``sweep --param inner_steps=...`` over ``maml`` and the estimators): per variant and K the
    cosine and relative error of its meta-gradient against the exact one, the CG residual (implicit), the peak
    and its ratio to ``maml``'s at that K, and the paired time against the cell's reference."""
    rows = read_cells(root / run)
    frame = cells_frame(rows)
    frame["K"] = [int(r.settings.get("inner_steps") or r.sizes["inner_steps"]) for r in rows]
    exact = {f["K"]: f["mem_mib"] for f in frame.to_dict("records") if f["variant"] == "maml" and f["status"] == "ok"}
    body = []
    order = {v: i for i, v in enumerate(dict.fromkeys(frame["variant"]))}  # the run's order of variants, then K
    for f in sorted(frame.to_dict("records"), key=lambda f: (order[f["variant"]], f["K"])):
        if f["status"] != "ok":
            body.append([f"`{f['variant']}`", str(f["K"]), f["status"], "", "", "", "", ""])
            continue
        is_exact = f["variant"] == "maml"
        mem, ref = f["mem_mib"], exact.get(f["K"])
        body.append([f"`{f['variant']}`", str(f["K"]),
                     "1 (exact)" if is_exact else fmt(f["fidelity_w_cosine"], 6),
                     "0 (exact)" if is_exact else fmt(f["fidelity_w_rel_err"], 2), fmt(f["fidelity_cg_residual"], 2),
                     fmt(mem), fmt_ratio(mem / ref) if mem is not None and ref else "—",
                     f["time_vs_ref_paired_text"] or "—"])
    return markdown_rows(["variant", "K", "cosine vs exact", "rel err vs exact", "CG residual", "peak MiB",
                          "peak / maml", "time / ref (paired, IQR)"], body)


def _diagnosis_cell(cell: dict) -> str:
    status = cell.get("status")
    if status == "raises":
        text = f"raises {cell.get('exception', 'an exception')}"
        m = re.search(r"\[(torch\.[\w.]+ \[[\d, ]*\])\]", cell.get("message") or "")
        if "inplace operation" in (cell.get("message") or ""):
            text += " (in-place" + (f"; `{m.group(1)}`" if m else "") + ")"
    else:
        errs = [f"{k} {fmt(cell.get(f'{k}_rel_err'), 2)}" for k in ("w", "lr") if cell.get(f"{k}_rel_err") is not None]
        text = "ok" if status == "ok" else f"{status} ({', '.join(errs)})"
    f64 = [f"{k} {fmt(cell[f'f64_{k}_rel_err'], 2)}" for k in ("w", "lr") if cell.get(f"f64_{k}_rel_err") is not None]
    return text + (f" [vs float64: {', '.join(f64)}]" if f64 else "")


def diagnosis_table(root: Path, source: str) -> list[str]:
    result = read_row(root / source, DiagnosisResult)
    engines = list(dict.fromkeys(e for cells in result.table.values() for e in cells))
    body = [[f"`{v}`", *(_diagnosis_cell(cells.get(e, {})) for e in engines)] for v, cells in result.table.items()]
    return markdown_rows(["variant", *(ENGINE_HEADS.get(e, e) for e in engines)], body)


def markdown_table_of(root: Path, source: str, number: str = "1") -> list[str]:
    path = root / source
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    tables: list[list[str]] = []
    previous = False
    for line in path.read_text().splitlines():
        is_row = line.startswith("|")
        if is_row and not previous:
            tables.append([])
        if is_row:
            tables[-1].append(line)
        previous = is_row
    if not number.isdigit() or not 1 <= int(number) <= len(tables):
        raise ResultsError(f"{path}: has {len(tables)} table(s), block asks for table {number!r}")
    return tables[int(number) - 1]


def check_table(root: Path, run: str) -> list[str]:
    """``python -m harness check``'s verdicts, one row per variant (:mod:`harness.reporting.verdicts`)."""
    return markdown_rows(["variant", "verdict"], [[f"`{v.variant}`", v.line] for v in verdicts(read_cells(root / run))])


KINDS: dict[str, Callable[..., list[str]]] = {"variants": variants_table, "cells": cells_table, "check": check_table,
                                              "paired-stability": paired_stability_table,
                                              "sweep-memory": sweep_memory_table, "scaling": scaling_table,
                                              "diagnosis": diagnosis_table, "md-table": markdown_table_of,
                                              "horizon": horizon_table, "fidelity": fidelity_table}


def render(block: Block, root: Path) -> str:
    """The body the block should have, from the committed files under ``root``."""
    fn = KINDS.get(block.kind)
    if fn is None:
        raise ConfigError(f"{block.path}:{block.line}: unknown generated block kind {block.kind!r}; "
                          f"kinds: {', '.join(KINDS)}")
    if not block.args:
        raise ConfigError(f"{block.path}:{block.line}: generated block {block.kind!r} names no source file")
    try:
        inspect.signature(fn).bind(root, *block.args)
    except TypeError:
        raise ConfigError(f"{block.path}:{block.line}: wrong arguments for {block.kind!r}: {' '.join(block.args)}") \
            from None
    return "\n".join(fn(root, *block.args))


def rewrite(text: str, path: Path, root: Path) -> str:
    """``text`` with every generated block's body replaced by what :func:`render` gives."""
    lines = text.split("\n")
    for block in reversed(find_blocks(text, path)):
        lines[block.start + 1:block.end] = render(block, root).split("\n")
    return "\n".join(lines)


class Drift(NamedTuple):
    path: Path
    line: int
    kind: str
    args: tuple[str, ...]


def doc_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def drifted(root: Path, files: list[Path] | None = None) -> list[Drift]:
    """The blocks whose body differs from what the committed results give."""
    out = []
    for path in files or doc_files(root):
        for block in find_blocks(path.read_text(), path):
            if block.body != render(block, root):
                out.append(Drift(path, block.line, block.kind, block.args))
    return out


def update(root: Path, files: list[Path] | None = None) -> list[Path]:
    """Rewrite every generated block under ``root``; returns the files that changed.  Every block is
    rendered before any file is written, so a bad block leaves all files as they were."""
    texts = {path: path.read_text() for path in files or doc_files(root)}
    new = {path: rewrite(text, path, root) for path, text in texts.items()}
    changed = [path for path in texts if new[path] != texts[path]]
    for path in changed:
        write_atomic(path, new[path])
    return changed


__all__ = ["START", "END", "KINDS", "Block", "Drift", "find_blocks", "render", "rewrite", "doc_files", "drifted",
           "update", "variants_table", "cells_table", "paired_stability_table", "scaling_table", "sweep_memory_table", "diagnosis_table", "markdown_table_of",
           "fidelity_table"]
