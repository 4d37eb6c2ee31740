"""Reading and writing result files: every result goes through a row type of :mod:`harness.reporting.schema`.

Writers validate a :class:`~harness.reporting.schema.Row` before writing it (a row of the wrong shape is a
bug: it raises).  :func:`write_atomic` is the one writer of every file the harness writes (rows, tables,
plots, claims): a temporary file, then ``os.replace`` -- an interrupted run leaves no half file, and a
symlink planted where a file goes is replaced, never written through.  JSON has no NaN/inf, so they are
stored as ``"nan"``/``"inf"``.  Readers return the row type, validated: a file that is missing, truncated,
not JSON, of another schema or malformed is a :class:`~harness.reporting.schema.ResultsError` naming the file (and the line of a ``.jsonl``), exit 2.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, TypeVar

from harness.reporting.schema import CellRow, ResultsError, Row

__all__ = ["by_identity", "cells_path", "read_cells", "read_row", "write_cells", "write_json", "write_jsonl",
           "write_atomic", "write_figure"]

R = TypeVar("R", bound=Row)


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as strings so files stay standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], Any], *, dir_fd: int | None = None) -> Path:
    """The one way the harness writes a file: ``content`` (text, bytes, or a function writing to a binary file,
    e.g. a figure's ``savefig``: :func:`write_figure`) into a fresh temporary file beside ``path`` (``O_EXCL``,
    no link followed), then ``os.replace`` onto ``path``.  The rename replaces whatever is at ``path`` -- a
    symlink too -- instead of writing through it, and an interrupted write leaves no half file.

    ``dir_fd``: an open folder ``path`` is relative to (its name only; the folder was opened without following
    a link, as the claims folder is); otherwise ``path``'s folder is created if missing."""
    path = Path(path)
    if dir_fd is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    else:
        folder = dir_fd
    tmp = f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                if isinstance(content, str):
                    fh.write(content.encode())
                elif isinstance(content, bytes):
                    fh.write(content)
                else:
                    content(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            raise
    finally:
        if dir_fd is None:
            os.close(folder)
    return path


def write_figure(path: Path, fig: Any, *, dpi: int = 110) -> Path:
    """A matplotlib figure saved by :func:`write_atomic` (format from the suffix: ``.png``)."""
    return write_atomic(path, lambda fh: fig.savefig(fh, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi))


def _plain(obj: Any) -> Any:
    """A row as the dict to write, validated first (a row of the wrong shape is a bug: it raises)."""
    if not isinstance(obj, Row):
        return obj
    data = obj.to_dict()
    type(obj).from_dict(_clean(data), f"{type(obj).__name__} being written")
    return data


def write_json(path: Path, obj: Any) -> Path:
    """One JSON document (a :class:`Row` or plain data), atomically."""
    return write_atomic(path, json.dumps(_clean(_plain(obj)), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON line per row (rows or plain data), atomically."""
    return write_atomic(path, "".join(json.dumps(_clean(_plain(r))) + "\n" for r in rows))


def write_cells(path: Path, rows: Iterable[CellRow]) -> Path:
    """``cells.jsonl``: each row a :class:`CellRow`, validated (anything else, or a malformed row, is a bug: it
    raises)."""
    rows = list(rows)
    strays = sorted({type(r).__name__ for r in rows if not isinstance(r, CellRow)})
    if strays:
        raise TypeError(f"{path}: cells.jsonl holds CellRow rows, got {', '.join(strays)}")
    return write_jsonl(path, rows)


# -- reading ---------------------------------------------------------------------------------------
def cells_path(path: Path) -> Path:
    """A run directory or its ``cells.jsonl`` -> the ``cells.jsonl``."""
    path = Path(path)
    return path / "cells.jsonl" if path.is_dir() or path.suffix != ".jsonl" else path


def read_cells(path: Path) -> list[CellRow]:
    """The rows of a ``cells.jsonl`` (or of a run directory), validated.

    :class:`ResultsError` naming the file (and the line) when it is missing, empty, truncated, not JSON,
    of another schema version, or has a field of the wrong type.
    """
    path = cells_path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file (expected a run directory with cells.jsonl)")
    text = path.read_text(errors="replace")
    if text and not text.endswith("\n"):
        raise ResultsError(f"{path}: truncated (last line is incomplete)")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise ResultsError(f"{path}: line {i} is not valid JSON (truncated or corrupted)") from None
        rows.append(CellRow.from_dict(data, f"{path}: line {i}"))
    if not rows:
        raise ResultsError(f"{path}: empty results file")
    return rows


def read_row(path: Path, row_type: type[R]) -> R:
    """One JSON result file (a run result, the diagnosis) as its row type; :class:`ResultsError` if not."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON (line {exc.lineno}; truncated or corrupted)") from None
    return row_type.from_dict(data, str(path))


def by_identity(rows: list[CellRow], path: Path) -> dict[str, CellRow]:
    """The rows by cell identity (``key``: variant, preset, device, dtype, every setting incl. precision and ranks,
    seed, the user's specs); two rows of one cell are a ResultsError naming it (one would hide the other)."""
    out: dict[str, CellRow] = {}
    for row in rows:
        settings = ",".join(f"{k}={v}" for k, v in sorted((row.settings or {}).items()))
        label = f"{row.variant} on {row.preset}" + (f" [{settings}]" if settings else "")
        if not row.key:
            raise ResultsError(f"{path}: a row of {label} has no cell key; rerun it with this harness")
        if row.key in out:
            raise ResultsError(f"{path}: two rows of one cell ({label}); a run holds one row per cell")
        out[row.key] = row
    return out
