"""Probes: small experiments that measure the mechanism behind each failure of the seed engine.

Which tensor a learnable LR's multiply saves, which backward modifies it in place, which tensors a reentrant
checkpoint's recomputation reads, where the learnable LRs' extra gradient comes from -- each probe returns its
measurements and ``holds`` (whether they show the mechanism docs/diagnosis.md describes), so the explanation is
checked on every run rather than asserted.  Run: ``python -m harness diagnose`` (float64 only).
"""
from __future__ import annotations

import traceback
import warnings
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as tuc
from torch import Tensor, nn

from harness.core.grads import split_grads
from harness.studies.seed.engine import adapted_modules
from harness.studies.seed.table import INPLACE, Setup, first_line, functional_learner, seed_learner
from harness.zoo.tasks import mse

__all__ = ["PROBES", "run_probes", "probe_saved_tensor", "probe_inplace", "probe_reentrant_edges",
           "probe_hook_routes", "probe_vanishing_second_order", "probe_non_reentrant_recompute",
           "probe_lr_pollution"]


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
    learner = seed_learner(model, setup, variant, reentrant)
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
    learner = seed_learner(model, setup, "ckpt", reentrant=True)
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
    learner = seed_learner(model, setup, "ckpt", reentrant=False)
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
        seed, _ = seed_learner(model, setup, "lr", reentrant=True).meta_gradients(tasks)
    ref_learner = functional_learner(model, setup, "lr", reference=True)
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
            w = ref_learner.inner_loop(w, values, task.support_x, task.support_y, range(k, k + 1))
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
    """Every probe's measurements and whether the mechanism it checks ``holds``."""
    out = {}
    for name, fn in PROBES.items():
        try:
            out[name] = fn(setup, device)
        except Exception as exc:  # noqa: BLE001 -- a probe that breaks is a finding too; never hide it
            out[name] = {"holds": False, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    return out
