"""The answer to the seed report, as an experiment: ``python -m harness diagnose``.

Two parts, each in its own module:

* :mod:`harness.studies.seed.table` -- the eight variants (checkpointing x learnable LR x order) under the
  report's stateful engine (reentrant and non-reentrant checkpointing) and the functional engine, each cell
  ``ok``, ``wrong`` (with the relative errors) or ``raises``; under ``--amp`` against the reference at the same
  precision and, in brackets, against float64;
* :mod:`harness.studies.seed.probes` -- small experiments that measure the mechanism behind each failure.

:mod:`harness.studies.seed.report` turns a diagnosis into text (its figures from the run); the full
explanation is docs/diagnosis.md.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from harness.reporting.files import write_json, write_atomic
from harness.reporting.provenance import environment
from harness.reporting.schema import DiagnosisResult
from harness.studies.seed.probes import run_probes
from harness.studies.seed.report import explanation, markdown
from harness.studies.seed.table import (AMP_TOL, ENGINE_TITLES, ENGINES, INPLACE, TOL, Setup, check_expectations,
                                        expected, run_table)
from harness.variants import CANONICAL

__all__ = ["diagnose", "run_diagnosis", "Diagnosis", "Setup", "run_table", "run_probes", "check_expectations", "explanation", "markdown",
           "ENGINES", "ENGINE_TITLES", "INPLACE", "TOL", "AMP_TOL"]


def diagnose(device: torch.device, setup: Setup | None = None) -> DiagnosisResult:
    """The table, its differences from the team's, and (float64 only) the probes, as the result row (no
    command or provenance yet: :func:`run_diagnosis` stamps them)."""
    setup = setup or Setup()
    table = run_table(setup, device)
    return DiagnosisResult(amp=setup.amp, setup=setup.__dict__, device=str(device),
                           dtype=str(setup.dtype).replace("torch.", ""), tolerance=setup.tol, table=table,
                           expected={v: {e: expected(e, v) for e in ENGINES} for v in CANONICAL},
                           differences=check_expectations(table),
                           probes=run_probes(setup, device) if setup.amp == "off" else {})


class Diagnosis(NamedTuple):
    """A finished diagnosis: the result row and the two files written."""

    result: DiagnosisResult
    json_path: Path
    md_path: Path


def run_diagnosis(device: torch.device, amp: str, out: Path, command: str) -> Diagnosis:
    """:func:`diagnose`, then ``<out>/diagnosis[-<amp>].json`` (a :class:`DiagnosisResult`) and ``.md``."""
    result = replace(diagnose(device, Setup(amp=amp)), command=command, env=environment(device))
    stem = "diagnosis" if amp == "off" else f"diagnosis-{amp}"
    json_path = write_json(out / f"{stem}.json", result)
    md_path = write_atomic(out / f"{stem}.md", markdown(result))
    return Diagnosis(result, json_path, md_path)
