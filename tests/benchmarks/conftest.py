"""The micro-benchmarks are timings: skipped in the test suite, run by ``make bench-micro`` (HARNESS_BENCH_MICRO=1)."""
from __future__ import annotations

import os

import pytest

RUN_ENV = "HARNESS_BENCH_MICRO"


@pytest.fixture(autouse=True)
def _only_when_asked() -> None:
    if os.environ.get(RUN_ENV) != "1":
        pytest.skip(f"micro-benchmark: run with make bench-micro ({RUN_ENV}=1)")
