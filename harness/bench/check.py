"""Is every variant exact on *my* model, and what does it cost?  The library behind ``python -m harness check``.

Why: the committed tables answer for the harness's presets; a user with a model of their own (the seed
report's ``nn.ModuleList`` whose forward calls ``torch.utils.checkpoint.checkpoint`` itself) needs the answer
for theirs before trusting a variant with it.  :func:`check_request` plans EVERY registered variant on the
user's model and tasks as bench cells (:func:`harness.bench.request.plan`, each cell in its own process,
resumable, ``cells.jsonl``/``summary.csv``/``table.md``/plots as ``bench`` writes them), in float64 by default
and with :attr:`~harness.bench.cells.MeasureOptions.fd_directions` set, so every second-order cell also gets
``fd_rel_err``: central differences of the mean query loss against its meta-gradient
(:mod:`harness.gradcheck`), a yardstick that does not share the engine.  :func:`verdicts` turns the rows into
one line per variant a user can act on:

* ``exact`` -- meta-gradients within :data:`AGREEMENT_TOL` of the non-checkpointed reference (weights and
  LRs, ``w_rel_err``/``lr_rel_err`` of the cell), and for second order within :data:`FD_TOL` of finite
  differences (float64 only: float32 cannot resolve ``h = 1e-5``); with peak memory and time against ``maml``;
* ``refused`` -- the variant refuses the model (a ``ConfigError``: cell status ``unsupported``), with the reason;
* ``WRONG`` -- a figure beyond its tolerance: do not use the variant on this model;
* ``FAILED`` -- the cell errored, ran out of memory, diverged or timed out (its message).

Exit 0 when every variant is exact or refused, 1 otherwise.  Try::

    python -m harness check --model tests/user_models.py:make_stack --tasks tests/user_models.py:regression
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness.bench.cells import MeasureOptions
from harness.bench.executors import ExecutorSpec
from harness.bench.request import MatrixOutcome, MatrixRequest, plan, run_request
from harness.reporting.verdicts import AGREEMENT_TOL, FD_TOL, Verdict, verdict, verdicts
from harness.variants import registry
from harness.zoo.user import UserSpecs

__all__ = ["AGREEMENT_TOL", "CheckOutcome", "DEFAULT_FD_DIRECTIONS", "FD_TOL", "Verdict", "check_request",
           "run_check", "verdict", "verdicts"]

DEFAULT_FD_DIRECTIONS = 2


@dataclass(frozen=True)
class CheckOutcome:
    matrix: MatrixOutcome
    verdicts: list[Verdict]

    @property
    def exit_code(self) -> int:
        return 0 if all(v.passed for v in self.verdicts) else 1


def check_request(user: UserSpecs, preset: str, device: str, dtype: str, seed: int, settings: dict[str, Any],
                  opts: MeasureOptions, run_dir: Path, *, fd_directions: int = DEFAULT_FD_DIRECTIONS,
                  plots_dir: Path | None = None, force: bool = False,
                  executor: ExecutorSpec = ExecutorSpec()) -> MatrixRequest:  # noqa: B008
    """Every registered variant on the user's model as bench cells; finite differences in float64 only."""
    cells = plan(list(registry()), preset, device, dtype, seed, settings, user=user)
    fd = fd_directions if dtype == "float64" else 0
    return MatrixRequest(cells, run_dir, replace(opts, fd_directions=fd), force=force, plots_dir=plots_dir,
                         executor=executor)


def run_check(req: MatrixRequest) -> CheckOutcome:
    """Run (or resume) the cells, rebuild the tables and plots, and judge every variant."""
    outcome = run_request(req)
    return CheckOutcome(outcome, verdicts(outcome.rows))
