"""The answer to the seed report, as an experiment: ``python -m harness diagnose``.

Two parts:

* :func:`run_table` -- the eight variants (checkpointing x learnable LR x
  order) under three engines: the report's stateful engine
  (:mod:`harness.studies.seed.engine`) with reentrant checkpointing, the same with
  non-reentrant checkpointing, and the functional engine
  (:class:`harness.core.engine.MetaLearner`).  Every cell is ``ok``, ``raises
  <Exception: first line>`` or ``wrong meta-gradient`` with the weight and LR
  relative errors against the functional float64 non-checkpointed reference
  of the same variant.  Under mixed precision (``Setup(amp="fp16"|"bf16")``:
  float32 model and data, autocast, a GradScaler for fp16) the reference is
  the functional engine's non-checkpointed run *at the same precision*, with
  the tolerance :data:`AMP_TOL`, and each cell also reports its relative error
  against the float64 reference.
* :func:`run_probes` -- small experiments that *measure* the mechanism behind
  each failure (which tensor is saved, which backward modifies it in place,
  which tensors a reentrant checkpoint's recomputation reads), so the
  explanation in ``docs/diagnosis.md`` is checked on every run rather than
  asserted.
"""
from __future__ import annotations

import copy
import traceback
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch import Tensor, nn

from harness.core.config import AMP_MODES, MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.core.grads import agreement, split_grads
from harness.studies.seed.engine import SeedConfig, SeedLearner, SeedModel, adapted_modules
from harness.zoo.tasks import Sinusoid, mse
from harness.variants import CANONICAL

ENGINES = ("seed_reentrant", "seed_non_reentrant", "functional")
ENGINE_TITLES = {"seed_reentrant": "seed + reentrant ckpt", "seed_non_reentrant": "seed + non-reentrant ckpt",
                 "functional": "functional engine"}
TOL = 1e-12
# Under mixed precision, `ok` means: within this relative error of the functional engine's non-checkpointed
# meta-gradients at the same precision.  Measured on torch 2.14.1 CPU (see docs/diagnosis.md): the correct cells
# (functional with/without checkpointing, seed maml/fo/ckpt_fo) agree with it exactly (rel err 0: the same ops in
# the same dtypes, the loss scale a power of two), the wrong seed cells are off by >= 0.12 (w) / 0.83 (lr), as in
# float64.  1e-3 sits between with three decades of room either way (for kernels that are not bitwise
# reproducible across calls on a GPU), and it is not the precision's own error: against float64 even the correct
# cells are off by ~1e-2 (bf16) / ~1e-3 (fp16), which is why the comparison is made at the same precision.
AMP_TOL = {"fp16": 1e-3, "bf16": 1e-3}
# fp16 loss scale: GradScaler starts at 2**16 and halves on every step whose gradients overflow (the step is
# skipped); the diagnosis uses the scale it settles at, the largest power of two <= 2**16 at which the functional
# non-checkpointed reference is finite (measured: 2**14 on this setup, 2**15 and 2**16 overflow fp16).
MAX_LOSS_SCALE_EXP, MIN_LOSS_SCALE_EXP = 16, 0
INPLACE = "one of the variables needed for gradient computation has been modified by an inplace operation"


@dataclass(frozen=True)
class Setup:
    """The small float64 problem every cell runs on."""

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
        return [t.to(device, self.dtype) for t in Sinusoid(shots=self.shots, query=self.shots).sample(self.meta_batch, gen)]


def flags(variant: str) -> dict[str, bool]:
    return {"layer_ckpt": "ckpt" in variant, "learn_lr": "lr" in variant, "first_order": variant.endswith("fo")}


def _functional(model: nn.Module, setup: Setup, variant: str, *, reference: bool = False) -> MetaLearner:
    f = flags(variant)
    if reference:
        f["layer_ckpt"] = False
    cfg = MetaConfig(inner_steps=setup.inner_steps, inner_lr=setup.inner_lr, amp=setup.amp, **f)
    return MetaLearner(copy.deepcopy(model), cfg, mse)


def _seed(model: nn.Module, setup: Setup, variant: str, reentrant: bool, scale: float = 2.0 ** 16) -> SeedLearner:
    cfg = SeedConfig(inner_steps=setup.inner_steps, inner_lr=setup.inner_lr, reentrant=reentrant, amp=setup.amp,
                     init_scale=scale, **flags(variant))
    return SeedLearner(copy.deepcopy(model), cfg, mse)


def _functional_grads(learner: MetaLearner, tasks: list[Task], scale: float = 1.0) -> dict[str, Tensor]:
    """Meta-gradients of the unscaled loss (fp16: taken on the loss scaled by ``scale``, then divided by it)."""
    if learner.cfg.amp != "fp16":
        return learner.meta_gradients(tasks)[0]
    grads, _ = learner.meta_gradients(tasks, loss_scale=scale)
    return {k: g / scale for k, g in grads.items()}


def _finite(grads: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads.values())


def reference(setup: Setup, variant: str, model: nn.Module, tasks: list[Task]) -> tuple[dict[str, Tensor], float]:
    """The functional non-checkpointed meta-gradients at the setup's precision, and the loss scale used.

    fp16: the largest power of two <= 2**16 that gives finite gradients -- where a GradScaler settles after
    backing off (it halves the scale and skips the step on overflow).  Other precisions: scale 1.
    """
    learner = _functional(model, setup, variant, reference=True)
    if setup.amp != "fp16":
        return _functional_grads(learner, tasks), 1.0
    for e in range(MAX_LOSS_SCALE_EXP, MIN_LOSS_SCALE_EXP - 1, -1):
        grads = _functional_grads(learner, tasks, 2.0 ** e)
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


def run_cell(engine: str, variant: str, setup: Setup, model: nn.Module, tasks: list[Task],
             ref: dict[str, Tensor], ref64: dict[str, Tensor] | None = None, scale: float = 1.0) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # retain_grad / .grad-of-non-leaf chatter
            if engine == "functional":
                grads = _functional_grads(_functional(model, setup, variant), tasks, scale)
            else:
                seed = _seed(model, setup, variant, reentrant=engine == "seed_reentrant", scale=scale)
                grads, _ = seed.meta_gradients(tasks)
    except Exception as exc:  # the point of the table: report it, don't stop
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
        table[variant] = {e: run_cell(e, variant, setup, model, tasks, ref, ref64, scale) for e in ENGINES}
        if setup.amp == "fp16":
            for cell in table[variant].values():
                cell["loss_scale"] = scale
    return table


# -- probes: measure the mechanism -------------------------------------------------------------------

def _fast_leaves(fast: nn.Module) -> dict[str, Tensor]:
    """The copy's original leaf parameters, by name, before the inner loop rebinds them."""
    return dict(fast.named_parameters())


def _blocks(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("blocks.")]


def probe_saved_tensor(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Which op saves ``param.grad``: ``softplus(raw) * param.grad`` does, ``inner_lr * param.grad`` does not."""
    g = torch.randn(3, dtype=torch.float64, device=device)
    raw = nn.Parameter(torch.zeros((), dtype=torch.float64, device=device))
    learnable = F.softplus(raw) * g
    w = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    fixed = w - setup.inner_lr * g
    const_mul = fixed.grad_fn.next_functions[1][0]  # SubBackward0 -> MulBackward (lr * g) or None
    g_graph = g.clone().requires_grad_()  # second order without ckpt: param.grad has a graph
    fixed_graph = (setup.inner_lr * g_graph).grad_fn
    saves_g = any(getattr(fixed_graph, a, None) is g_graph for a in ("_saved_self", "_saved_other"))
    return {
        "learnable_lr_node": type(learnable.grad_fn).__name__,
        "learnable_lr_saves_param_grad": learnable.grad_fn._saved_other is g,
        "fixed_lr_mul_in_graph_when_grad_has_no_graph": const_mul is not None,
        "fixed_lr_mul_saves_param_grad_when_grad_has_graph": saves_g,
        "holds": learnable.grad_fn._saved_other is g and const_mul is None and not saves_g,
    }


def _trace_versions(setup: Setup, device: torch.device, variant: str, reentrant: bool) -> dict[str, Any]:
    """Run the seed engine on one task under anomaly mode, keeping each copy leaf's ``.grad`` after the
    first inner step and its ``_version``; afterwards: which of those tensors were modified in place,
    where the error (if any) surfaced, and which forward op anomaly mode blames."""
    model, task = setup.model(device), setup.tasks(device)[0]
    learner = _seed(model, setup, variant, reentrant)
    fast = learner.context()
    leaves = _fast_leaves(fast)
    phase, error, nodes, forward_lines = "inner step 1", None, [], []
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=False):
        warnings.simplefilter("always")
        learner.inner_step(fast, mse(fast(task.support_x), task.support_y))
        g1 = {n: p.grad for n, p in leaves.items()}
        v1 = {n: g._version for n, g in g1.items()}
        graph = sorted(n for n, g in g1.items() if g.grad_fn is not None)
        try:
            for k in range(1, setup.inner_steps):
                phase = f"inner step {k + 1} backward"
                learner.inner_step(fast, mse(fast(task.support_x), task.support_y))
            phase = "outer backward"
            learner.outer_backward(fast, mse(fast(task.query_x), task.query_y))
        except RuntimeError as exc:
            error = first_line(exc)
    for w in caught:
        text = str(w.message)
        if text.startswith("Error detected in"):
            nodes.append(text.split()[3].rstrip("."))
            forward_lines += [ln.strip() for ln in text.splitlines() if "* param.grad" in ln]
    in_place = sorted(n for n, g in g1.items() if g._version > v1[n])
    return {"grad_accumulated_in_place": in_place, "grad_has_graph_after_step1": graph,
            "error_in": phase if error else None, "error": error,
            "anomaly_nodes": nodes, "anomaly_forward_lines": sorted(set(forward_lines))}


def probe_inplace(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Which first-step ``param.grad`` tensors the later backwards modify in place, with and without a
    learnable LR, and where the version-counter error surfaces."""
    names = sorted(dict(setup.model(device).named_parameters()))
    blocks = _blocks(names)
    cases = {
        "ckpt_reentrant_fixed_lr": _trace_versions(setup, device, "ckpt", reentrant=True),
        "ckpt_lr_reentrant": _trace_versions(setup, device, "ckpt_lr", reentrant=True),
        "ckpt_lr_reentrant_1_step": _trace_versions(replace(setup, inner_steps=1), device, "ckpt_lr", reentrant=True),
        "ckpt_lr_non_reentrant": _trace_versions(setup, device, "ckpt_lr", reentrant=False),
        "lr_1_step": _trace_versions(replace(setup, inner_steps=1), device, "lr", reentrant=True),
        "fo_fixed_lr": _trace_versions(setup, device, "fo", reentrant=True),
        "lr_fo": _trace_versions(setup, device, "lr_fo", reentrant=True),
    }
    c = cases

    def raised(case: dict[str, Any]) -> bool:
        return INPLACE in (case["error"] or "") and "MulBackward0" in case["anomaly_nodes"] \
            and any("lr * param.grad" in ln for ln in case["anomaly_forward_lines"])

    holds = (c["ckpt_reentrant_fixed_lr"]["grad_accumulated_in_place"] == blocks and not c["ckpt_reentrant_fixed_lr"]["error"]
             and raised(c["ckpt_lr_reentrant"]) and set(c["ckpt_lr_reentrant"]["grad_accumulated_in_place"]) <= set(blocks)
             and raised(c["ckpt_lr_reentrant_1_step"]) and c["ckpt_lr_reentrant_1_step"]["error_in"] == "outer backward"
             and c["ckpt_lr_non_reentrant"]["grad_accumulated_in_place"] == [] and not c["ckpt_lr_non_reentrant"]["error"]
             and c["lr_1_step"]["grad_accumulated_in_place"] == names and not c["lr_1_step"]["error"]
             and c["fo_fixed_lr"]["grad_accumulated_in_place"] == names and not c["fo_fixed_lr"]["error"]
             and raised(c["lr_fo"]))
    return {**cases, "holds": holds}


def probe_reentrant_edges(device: torch.device) -> dict[str, Any]:
    """A reentrant checkpoint's node has an edge to its input only; its backward differentiates
    whatever parameters the module holds *at backward time*."""
    lin = nn.Linear(3, 3).to(device, torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    out = tuc.checkpoint(lin, x, use_reentrant=True)
    edges = len(out.grad_fn.next_functions)
    used = lin.weight
    swapped = nn.Parameter(torch.randn_like(used))
    vars(lin)["_parameters"]["weight"] = swapped  # rebind after the forward, like an inner step does
    out.sum().backward()
    return {"checkpoint_node": type(out.grad_fn).__name__, "edges": edges,
            "forward_weight_got_grad": used.grad is not None, "backward_time_weight_got_grad": swapped.grad is not None,
            "holds": edges == 1 and used.grad is None and swapped.grad is not None}


def probe_hook_routes(setup: Setup, device: torch.device) -> dict[str, Any]:
    """In the seed's outer backward (reentrant ckpt), the hooks on the copy's checkpointed leaves fire
    from inside the checkpoint's nested ``torch.autograd.backward``; which weights did the recomputation read?"""
    model, task = setup.model(device), setup.tasks(device)[0]
    learner = _seed(model, setup, "ckpt", reentrant=True)
    fast = learner.context()
    leaves = _fast_leaves(fast)
    fired: dict[str, list[bool]] = {n: [] for n in leaves}
    for n, p in leaves.items():
        def record(grad: Tensor, n: str = n) -> None:
            if fast.seed_propagate:
                fired[n].append(any(f.name == "backward" and f.filename.endswith("checkpoint.py")
                                    for f in traceback.extract_stack()))
        p.register_hook(record)
    labels: dict[int, str] = {}
    seen: list[tuple[str, str]] = []
    linears = {path: m for path, m in adapted_modules(fast) if path.startswith("blocks.")}
    for path, m in linears.items():
        m.register_forward_pre_hook(lambda m, a, path=path: seen.append((path, labels.get(id(m.weight), "?"))))
    phase = "w0"
    for path, m in linears.items():
        labels[id(m.weight)] = "w0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(setup.inner_steps):
            learner.inner_step(fast, mse(fast(task.support_x), task.support_y))
            phase = f"w{k + 1}"
            for path, m in linears.items():
                labels[id(m.weight)] = phase
        loss = mse(fast(task.query_x), task.query_y)
        start = len(seen)
        learner.outer_backward(fast, loss)
    recomputed = sorted({lab for _, lab in seen[start:]})
    blocks = _blocks(list(leaves))
    nested = all(fired[n] and all(fired[n]) for n in blocks)
    return {"block_leaf_hooks_fired_inside_checkpoint_backward": nested,
            "outer_backward_recomputation_read": recomputed, "final_fast_weights": phase,
            "holds": nested and recomputed == [phase]}


def probe_vanishing_second_order(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Reentrant: after the first inner ``.backward(create_graph=True)`` the checkpointed layers' ``.grad``
    has no graph (the nested backward ran without ``create_graph``), so second-order terms through them vanish."""
    t = _trace_versions(setup, device, "ckpt", reentrant=True)
    names = sorted(dict(setup.model(device).named_parameters()))
    constant = sorted(set(names) - set(t["grad_has_graph_after_step1"]))
    return {"grad_without_graph_after_step1": constant, "holds": constant == _blocks(names)}


def probe_non_reentrant_recompute(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Non-reentrant, second order: during the outer backward the checkpoint recomputes the inner steps'
    forwards again, reading the module's *current* parameters (the final fast weights)."""
    model, task = setup.model(device), setup.tasks(device)[0]
    learner = _seed(model, setup, "ckpt", reentrant=False)
    fast = learner.context()
    labels: dict[int, str] = {}
    seen: list[str] = []
    linears = {path: m for path, m in adapted_modules(fast) if path.startswith("blocks.")}
    for m in linears.values():
        m.register_forward_pre_hook(lambda m, a: seen.append(labels.get(id(m.weight), "?")))
        labels[id(m.weight)] = "w0"
    final = "w0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(setup.inner_steps):
            learner.inner_step(fast, mse(fast(task.support_x), task.support_y))
            final = f"w{k + 1}"
            for m in linears.values():
                labels[id(m.weight)] = final
        fwd = len(seen)
        loss = mse(fast(task.query_x), task.query_y)
        start = len(seen)
        learner.outer_backward(fast, loss)
    recomputes = len(seen) - start
    expected = len(linears) * (setup.inner_steps + 1)  # one recompute per checkpointed forward, query included
    return {"block_forwards_during_outer_backward": recomputes, "forwards_before_outer": fwd,
            "weights_read_during_outer_backward": sorted(set(seen[start:])),
            "holds": recomputes > len(linears) and set(seen[start:]) == {final} and recomputes == expected}


def probe_lr_pollution(setup: Setup, device: torch.device) -> dict[str, Any]:
    """Seed, learnable LR, second order, no checkpointing: its LR gradient minus the reference equals the
    gradient of the inner support losses w.r.t. the raw LRs (steps 2..K), accumulated by the inner ``.backward()``."""
    model, tasks = setup.model(device), setup.tasks(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seed, _ = _seed(model, setup, "lr", reentrant=True).meta_gradients(tasks)
    ref_learner = _functional(model, setup, "lr", reference=True)
    ref, _ = ref_learner.meta_gradients(tasks)
    lrs = ref_learner.lrs
    keys = list(lrs.raw)
    inner = {k: torch.zeros_like(v) for k, v in lrs.raw.items()}
    for task in tasks:
        w = ref_learner.initial_weights()
        values = lrs.values()
        for k in range(setup.inner_steps):
            loss = mse(ref_learner.forward_with(w, task.support_x), task.support_y)
            if k > 0:
                for key, g in zip(keys, torch.autograd.grad(loss, [lrs.raw[k_] for k_ in keys], retain_graph=True)):
                    inner[key] += g
            w = ref_learner._inner_steps(w, values, task.support_x, task.support_y, range(k, k + 1))
    _, seed_lr = split_grads(seed)
    _, ref_lr = split_grads(ref)

    def rel(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
        fa, fb = (torch.cat([t[k].reshape(-1) for k in sorted(a)]) for t in (a, b))
        return ((fa - fb).norm() / fb.norm()).item()

    explained = {f"lr.{k}": ref_lr[f"lr.{k}"] + inner[k] for k in keys}
    before, after = rel(seed_lr, ref_lr), rel(seed_lr, explained)
    return {"lr_rel_err": before, "lr_rel_err_after_adding_inner_loss_grads": after,
            "holds": before > 1e-3 and after <= 1e-10}


PROBES: dict[str, Callable[[Setup, torch.device], dict[str, Any]]] = {
    "saved_tensor": probe_saved_tensor,
    "inplace": probe_inplace,
    "reentrant_edges": lambda s, d: probe_reentrant_edges(d),
    "hook_routes": probe_hook_routes,
    "vanishing_second_order": probe_vanishing_second_order,
    "non_reentrant_recompute": probe_non_reentrant_recompute,
    "lr_pollution": probe_lr_pollution,
}


def run_probes(setup: Setup, device: torch.device) -> dict[str, dict[str, Any]]:
    out = {}
    for name, fn in PROBES.items():
        try:
            out[name] = fn(setup, device)
        except Exception as exc:  # a probe that breaks is a finding too; never hide it
            out[name] = {"holds": False, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    return out


# -- expectations and text -----------------------------------------------------------------------------

def expected(engine: str, variant: str) -> str:
    """The classification the team measured (torch 2.11/2.13, CPU and H100)."""
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


SHORT_EXPLANATION = """\
(1) Why multiplying by a learnable LR breaks the backward only with checkpointing (probes `saved_tensor`, `inplace`):
  `softplus(raw) * param.grad` is MulBackward0, which saves `param.grad` itself (the LR's gradient needs it);
  `0.1 * param.grad` saves only the constant. The next backward that reaches the copy's leaf parameter adds
  into that same `param.grad` tensor: AccumulateGrad does `grad += new` IN PLACE when the backward runs with
  grad mode off (no create_graph), out of place (a new tensor) when it runs with create_graph=True.
  - reentrant checkpoint: its backward re-runs the layer and calls `torch.autograd.backward(...)` WITHOUT
    create_graph, even inside `.backward(create_graph=True)`; so the checkpointed layers' first-step `.grad`
    goes from version 0 to 1 (measured: exactly the block parameters, embed/head untouched). MulBackward0 then
    finds its saved tensor at version 1 -> the error (anomaly mode blames `new_param = param - lr * param.grad`).
    It surfaces in the 2nd inner step's backward (the outer backward with 1 inner step).
  - no checkpoint, second order: the inner backward has create_graph=True (out of place); the outer backward
    does bump it in place (measured, 1 inner step) but only after MulBackward0 used it: `.grad` has a graph back
    to the parameter, so the parameter's AccumulateGrad waits for that path. No error.
  - first order: every backward runs with grad mode off, `.grad` has no graph -> `lr_fo` raises even without
    checkpointing. With a constant LR the same in-place bumps happen, but nothing saved the tensor.
(2) Why gradients reach the fast weights at all (probes `reentrant_edges`, `hook_routes`):
  not through the outer graph: the reentrant checkpoint's node has one edge, to its input x. Its backward
  re-runs the layer with whatever tensors are in the module's `_parameters` AT BACKWARD TIME (the final fast
  weights; a weight rebound after the forward gets the gradient, the one used gets none) and runs a nested
  `torch.autograd.backward`, which walks the fast weights' own graph (w_k = w_{k-1} - lr * g) down to the
  copy's leaves; their hooks copy it to the original model (measured: fired inside the checkpoint's backward).
  The same mechanism makes results wrong: the nested backward has no create_graph, so inner gradients of
  checkpointed layers are constants and second-order terms through them vanish (`ckpt`, tens of percent);
  non-reentrant checkpointing recomputes every inner step's forward again during the outer backward, reading
  the FINAL fast weights (silently wrong); and the inner `.backward()` also accumulates the support losses'
  gradients into the LRs' `.grad` (`lr`: the excess equals d(support loss of steps 2..K)/d raw to 1e-16).
Fix: the functional engine (fast weights as an explicit dict, torch.autograd.grad, harness.checkpoint with the
  weights as checkpoint inputs): ok in all eight cells, rel err <= 1e-12."""


def markdown(result: dict[str, Any]) -> str:
    table = result["table"]
    amp = result.get("amp", "off")
    if amp == "off":
        precision = "float64"
        cells = ("Cells: meta-gradients (initial weights `w`, raw LRs `lr`) against the functional float64 "
                 "non-checkpointed reference of the same variant.")
    else:
        scales = sorted({c["loss_scale"] for row in table.values() for c in row.values() if "loss_scale" in c})
        precision = f"float32 weights and data, autocast {amp}" + (
            " + GradScaler (loss scale " + ", ".join(f"2^{int(s).bit_length() - 1}" for s in scales) + ")"
            if amp == "fp16" else "")
        cells = (f"Cells: meta-gradients (initial weights `w`, raw LRs `lr`) against the functional engine's "
                 f"non-checkpointed reference of the same variant at the same precision ({amp}"
                 + (", gradients unscaled" if amp == "fp16" else "") + f"); `ok` = rel err <= {result['tolerance']:g}. "
                 "[vs float64: ...] is the relative error against the functional float64 reference (same initial "
                 "weights and tasks): the precision's own error, for comparison.")
    lines = ["# Diagnosis: the seed's stateful MAML vs the functional engine"
             + (f" (mixed precision: {amp})" if amp != "off" else ""), "",
             f"Command: `{result['command']}`  ", f"Device: {result['device']}, {precision}, "
             f"{result['setup']['inner_steps']} inner steps, inner LR {result['setup']['inner_lr']}, "
             f"meta-batch {result['setup']['meta_batch']}; torch {result['env']['torch']}", "",
             cells, "",
             "| variant | " + " | ".join(ENGINE_TITLES[e] for e in ENGINES) + " |",
             "|---|" + "---|" * len(ENGINES)]
    for variant, row in table.items():
        lines.append(f"| `{variant}` | " + " | ".join(row[e]["text"].replace("|", "\\|") for e in ENGINES) + " |")
    lines += ["", "Differences from the team's table (torch 2.11/2.13): "
              + ("none." if not result["differences"] else ""), *[f"- {d}" for d in result["differences"]], "",
              "## Probes (each measured on this run)", ""]
    if not result["probes"]:
        lines.append("Not run under mixed precision: the probes measure the mechanism in float64 "
                     "(`python -m harness diagnose`, results/diagnosis.md).")
    def fmt(v: Any) -> str:
        if isinstance(v, str) and len(v) > 60:
            return v[:60] + "..."
        return str(v)

    for name, p in result["probes"].items():
        flat = {k: v for k, v in p.items() if k != "holds" and not isinstance(v, dict)}
        lines.append(f"- `{name}`: {'holds' if p.get('holds') else 'DOES NOT HOLD'}"
                     + (" -- " + ", ".join(f"{k}={fmt(v)}" for k, v in flat.items()) if flat else ""))
        for k, v in p.items():
            if isinstance(v, dict):
                lines.append(f"  - {k}: " + ", ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items()))
    lines += ["", "## Explanation (short; full version in docs/diagnosis.md)", "", "```", SHORT_EXPLANATION, "```", "",
              "## Provenance", "", "```"]
    lines += [f"{k}: {v}" for k, v in result["env"].items()]
    lines += ["```", ""]
    return "\n".join(lines)


def diagnose(device: torch.device, setup: Setup | None = None) -> dict[str, Any]:
    """The table, its differences from the team's, and (float64 only) the probes."""
    setup = setup or Setup()
    table = run_table(setup, device)
    return {"setup": setup.__dict__, "device": str(device), "dtype": str(setup.dtype).replace("torch.", ""),
            "tolerance": setup.tol, "table": table,
            "expected": {v: {e: expected(e, v) for e in ENGINES} for v in CANONICAL},
            "differences": check_expectations(table),
            "probes": run_probes(setup, device) if setup.amp == "off" else {}}
