"""Result files: written atomically (temporary file in the same folder, then ``os.replace``),
so an interrupted run never leaves a half-written file behind."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as strings so files stay standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))
