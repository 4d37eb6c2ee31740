"""The one schema version of every result file, and the migrations that read an older file.

Every row the harness writes carries ``"schema": SCHEMA_VERSION``.  Reading a row (``Row.from_dict`` in
:mod:`harness.reporting.schema`) first calls :func:`migrate`: a row of an older version is brought up one
version at a time through :data:`MIGRATIONS`, as plain data, before its fields are validated; a version this
code cannot read -- a newer harness's, or an old one without a migration -- is a :class:`ResultsError`
naming the versions it reads (one line, exit 2).

Changing what a field means or holds: bump :data:`SCHEMA_VERSION` to ``n + 1`` and add ``MIGRATIONS[n]``,
a function from a version-``n`` row (a dict) to a version-``n + 1`` one, so that every committed
``results/`` file still reads (``tests/test_rows_typed.py`` reads a version-1 row).  Ablation cells were
once written with ``"schema": 2``, before the one version: the next version is 3, never 2.
"""
from __future__ import annotations

from typing import Any, Callable

from harness.core.config import ConfigError

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "Migration", "ResultsError", "readable_versions", "migrate"]

SCHEMA_VERSION = 1  # one version for every row type; bump it when a field changes meaning or type
Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}  # version n -> the row of version n as a row of version n + 1


class ResultsError(ConfigError):
    """A results file is missing, truncated, of another schema or malformed (one line, exit 2)."""


def readable_versions() -> tuple[int, ...]:
    """The versions this code reads: :data:`SCHEMA_VERSION` and each older one with migrations up to it."""
    versions = [SCHEMA_VERSION]
    while versions[0] - 1 in MIGRATIONS:
        versions.insert(0, versions[0] - 1)
    return tuple(versions)


def migrate(data: dict[str, Any], where: str = "row") -> dict[str, Any]:
    """``data`` (a row as read) at :data:`SCHEMA_VERSION`, one :data:`MIGRATIONS` step per version;
    :class:`ResultsError` naming ``where`` and the versions this code reads if it cannot read it."""
    version, readable = data.get("schema"), readable_versions()
    if type(version) is not int or version not in readable:
        newer = type(version) is int and version > SCHEMA_VERSION
        raise ResultsError(f"{where} has schema version {version!r}, expected {' or '.join(map(str, readable))} "
                           f"(the versions this code reads{'; written by a newer harness' if newer else ''})")
    while version < SCHEMA_VERSION:
        data = {**MIGRATIONS[version](dict(data)), "schema": version + 1}
        version += 1
    return data
