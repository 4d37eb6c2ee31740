"""The diagnosis table: the eight variants under three engines, each cell ``ok``, ``wrong`` or ``raises``.

The engines are the seed report's stateful engine (:mod:`harness.studies.seed.engine`) with reentrant
checkpointing, the same with non-reentrant checkpointing, and the functional engine
(:class:`harness.core.engine.MetaLearner`).  A cell is ``ok`` when its meta-gradients (weights and raw LRs)
are within :attr:`Setup.tol` of the functional non-checkpointed reference of the same variant at the same
precision, ``wrong`` with the relative errors otherwise, ``raises <Exception: first line>`` when it raises.
Under mixed precision each cell also reports its error against the float64 reference.  How the tolerances
were chosen, with the figures that justify them: docs/diagnosis.md (§ mixed precision).

Run: ``python -m harness diagnose`` (``--amp fp16|bf16``).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from harness.core.config import AMP_MODES, Task
from harness.core.engine import MetaLearner
from harness.core.grads import agreement
from harness.studies.seed.engine import SeedConfig, SeedLearner, SeedModel
from harness.loop.agreement import unscaled_meta_gradients
from harness.variants import CANONICAL, get_variant
from harness.zoo.tasks import Sinusoid, mse

__all__ = ["ENGINES", "ENGINE_TITLES", "TOL", "AMP_TOL", "INPLACE", "Setup", "flags", "functional_learner",
           "seed_learner", "reference", "first_line", "classify", "measure_engine", "run_table", "expected",
           "check_expectations"]

ENGINES = ("seed_reentrant", "seed_non_reentrant", "functional")
ENGINE_TITLES = {"seed_reentrant": "seed + reentrant ckpt", "seed_non_reentrant": "seed + non-reentrant ckpt",
                 "functional": "functional engine"}
TOL = 1e-12  # float64: the functional engine's checkpointed and plain gradients agree to rounding
AMP_TOL = {"fp16": 1e-3, "bf16": 1e-3}  # same-precision tolerance; why 1e-3: docs/diagnosis.md (mixed precision)
# fp16 loss scale: the largest power of two in [2**MIN, 2**MAX] at which the reference is finite, where a
# GradScaler starting at 2**16 settles after backing off; the scale found is recorded per cell (``loss_scale``)
MAX_LOSS_SCALE_EXP, MIN_LOSS_SCALE_EXP = 16, 0
INPLACE = "one of the variables needed for gradient computation has been modified by an inplace operation"


@dataclass(frozen=True)
class Setup:
    """The small problem every cell runs on (float64 without AMP)."""

    inner_steps: int = 2  # the report's inner loop; >= 2 so fast-weight bugs show
    inner_lr: float = 0.1
    width: int = 16
    depth: int = 2
    meta_batch: int = 2
    shots: int = 5
    seed: int = 0
    amp: str = "off"  # off: float64; fp16 / bf16: float32 model and data under autocast (+ GradScaler for fp16)

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown precision {self.amp!r}; valid choices: {', '.join(AMP_MODES)}")

    @property
    def dtype(self) -> torch.dtype:
        """float64 without AMP; float32 with it (autocast does not apply to float64)."""
        return torch.float64 if self.amp == "off" else torch.float32

    @property
    def tol(self) -> float:
        return TOL if self.amp == "off" else AMP_TOL[self.amp]

    def model(self, device: torch.device) -> SeedModel:
        torch.manual_seed(self.seed)  # same initial weights at every precision (created in float32, then cast)
        return SeedModel(width=self.width, depth=self.depth, ckpt="harness").to(device, self.dtype)

    def tasks(self, device: torch.device) -> list[Task]:
        gen = torch.Generator().manual_seed(self.seed + 1)  # float32 samples, cast: the same tasks at every precision
        sampler = Sinusoid(shots=self.shots, query=self.shots)
        return [t.to(device, self.dtype) for t in sampler.sample(self.meta_batch, gen)]


def flags(variant: str) -> dict[str, bool]:
    """The three switches the seed engine knows, as the variant registry declares them."""
    f = get_variant(variant).flags
    return {k: bool(f[k]) for k in ("layer_ckpt", "learn_lr", "first_order")}


def functional_learner(model: nn.Module, setup: Setup, variant: str, *, reference: bool = False) -> MetaLearner:
    v = get_variant(variant)
    cfg = (v.reference() if reference else v).config(inner_steps=setup.inner_steps, inner_lr=setup.inner_lr,
                                                      amp=setup.amp)
    return MetaLearner(copy.deepcopy(model), cfg, mse)


def seed_learner(model: nn.Module, setup: Setup, variant: str, reentrant: bool,
                 scale: float = 2.0 ** 16) -> SeedLearner:
    cfg = SeedConfig(inner_steps=setup.inner_steps, inner_lr=setup.inner_lr, reentrant=reentrant, amp=setup.amp,
                     init_scale=scale, **flags(variant))
    return SeedLearner(copy.deepcopy(model), cfg, mse)


def _finite(grads: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads.values())


def reference(setup: Setup, variant: str, model: nn.Module, tasks: list[Task]) -> tuple[dict[str, Tensor], float]:
    """The functional non-checkpointed meta-gradients at the setup's precision, and the loss scale used.

    fp16: the largest power of two <= 2**16 that gives finite gradients -- where a GradScaler settles after
    backing off (it halves the scale and skips the step on overflow).  Other precisions: scale 1.
    """
    learner = functional_learner(model, setup, variant, reference=True)
    if setup.amp != "fp16":
        return unscaled_meta_gradients(learner, tasks, scale=1.0), 1.0
    for e in range(MAX_LOSS_SCALE_EXP, MIN_LOSS_SCALE_EXP - 1, -1):
        grads = unscaled_meta_gradients(learner, tasks, scale=2.0 ** e)
        if _finite(grads):
            return grads, 2.0 ** e
    return grads, 2.0 ** MIN_LOSS_SCALE_EXP  # non-finite even unscaled: every cell will say so


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _rel_errs(grads: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, float | None]:
    if set(grads) != set(ref):
        raise KeyError(f"meta-gradient names differ from the reference: {sorted(set(grads) ^ set(ref))}")
    # agreement() pairs tensors by dict order (the functional engine's ParameterDict sorts LR keys)
    agree = agreement({k: grads[k] for k in ref}, ref)
    return agree["w_rel_err"], agree["lr_rel_err"]


def classify(grads: dict[str, Tensor], ref: dict[str, Tensor], tol: float = TOL,
             ref64: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """``ok`` / ``wrong`` against ``ref`` (same precision) within ``tol``; with ``ref64`` (mixed precision)
    also the relative errors against the float64 reference (``f64_w_rel_err``, ``f64_lr_rel_err``)."""
    w, lr = _rel_errs(grads, ref)
    ok = w <= tol and (lr is None or lr <= tol)  # NaN (a non-finite fp16 gradient) is never ok
    errs = f"w rel err {w:.3g}" + (f", lr rel err {lr:.3g}" if lr is not None else "")
    cell: dict[str, Any] = {"status": "ok" if ok else "wrong", "w_rel_err": w, "lr_rel_err": lr,
                            "text": "ok" if ok else f"wrong meta-gradient ({errs})"}
    if ref64 is not None:
        w64, lr64 = _rel_errs({k: g.double() for k, g in grads.items()}, ref64)
        cell.update(f64_w_rel_err=w64, f64_lr_rel_err=lr64)
        cell["text"] += f" [vs float64: w {w64:.2g}" + (f", lr {lr64:.2g}" if lr64 is not None else "") + "]"
    return cell


def measure_engine(engine: str, variant: str, setup: Setup, model: nn.Module, tasks: list[Task],
                   ref: dict[str, Tensor], ref64: dict[str, Tensor] | None = None,
                   scale: float = 1.0) -> dict[str, Any]:
    """One table cell: ``engine``'s meta-gradients for ``variant`` classified against ``ref``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # retain_grad / .grad-of-non-leaf chatter
            if engine == "functional":
                grads = unscaled_meta_gradients(functional_learner(model, setup, variant), tasks, scale=scale)
            else:
                seed = seed_learner(model, setup, variant, reentrant=engine == "seed_reentrant", scale=scale)
                grads, _ = seed.meta_gradients(tasks)
    except Exception as exc:  # noqa: BLE001 -- the point of the table: report it, don't stop
        msg = f"{type(exc).__name__}: {first_line(exc).split(' Hint:')[0]}"
        return {"status": "raises", "exception": type(exc).__name__, "message": first_line(exc),
                "w_rel_err": None, "lr_rel_err": None, "text": f"raises {msg}"}
    return classify(grads, ref, setup.tol, ref64)


def run_table(setup: Setup, device: torch.device) -> dict[str, dict[str, dict[str, Any]]]:
    """``{variant: {engine: cell}}`` for the eight canonical variants.

    Without AMP: against the functional float64 non-checkpointed reference.  With AMP: against the functional
    non-checkpointed reference at the same precision (float32 + autocast, fp16 with a loss scale), and
    additionally against the float64 one (the same initial weights and tasks, cast).
    """
    model, tasks = setup.model(device), setup.tasks(device)
    f64 = replace(setup, amp="off") if setup.amp != "off" else None
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in CANONICAL:
        ref, scale = reference(setup, variant, model, tasks)
        ref64 = reference(f64, variant, f64.model(device), f64.tasks(device))[0] if f64 is not None else None
        table[variant] = {e: measure_engine(e, variant, setup, model, tasks, ref, ref64, scale) for e in ENGINES}
        if setup.amp == "fp16":
            for cell in table[variant].values():
                cell["loss_scale"] = scale
    return table


def expected(engine: str, variant: str) -> str:
    """The classification in the seed team's report (their table; see docs/diagnosis.md)."""
    f = flags(variant)
    if engine == "functional":
        return "ok"
    reentrant = engine == "seed_reentrant"
    if f["learn_lr"] and f["first_order"]:
        return "raises"  # inner .backward() bumps param.grad that lr * param.grad saved
    if f["learn_lr"] and f["layer_ckpt"] and reentrant:
        return "raises"  # the reentrant nested backward bumps it
    if f["first_order"]:
        return "ok"
    if f["layer_ckpt"] or f["learn_lr"]:
        return "wrong"
    return "ok"


def check_expectations(table: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Cells that differ from :func:`expected` (empty when the table reproduces the team's)."""
    out = []
    for variant, row in table.items():
        for engine, cell in row.items():
            want = expected(engine, variant)
            if cell["status"] != want or (cell["status"] == "raises" and INPLACE not in cell["message"]):
                out.append(f"{variant} / {engine}: expected {want}, got {cell['text']}")
    return out
