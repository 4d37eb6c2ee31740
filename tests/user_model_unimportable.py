"""A user's module that does not import (a dependency that is not installed): ``--model`` says so in one line.

    python -m harness run --variant maml --model tests.user_model_unimportable:make   # exit 2
"""
from __future__ import annotations

import a_dependency_that_is_not_installed  # noqa: F401

__all__ = ["make"]


def make() -> None:  # pragma: no cover - never reached
    return None
