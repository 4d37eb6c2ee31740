"""The diagnosis as text: the short explanation, with every figure taken from the run, and ``diagnosis.md``.

A sentence that states a measured figure reads it from the run's own table or probes (and says "not measured in
this run" where the run has none, e.g. the probes under mixed precision); the full explanation, with the figures
of the committed run named by file, is docs/diagnosis.md.  Run: ``python -m harness diagnose``.
"""
from __future__ import annotations

from typing import Any

from harness.reporting.schema import DiagnosisResult
from harness.studies.seed.table import ENGINE_TITLES, ENGINES

__all__ = ["explanation", "markdown"]

NOT_MEASURED = "not measured in this run"


def _probe(result: DiagnosisResult, name: str, *keys: str) -> Any:
    """``result.probes[name][keys...]``, or ``None`` when the run has no such measurement."""
    node: Any = result.probes.get(name)
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _names(names: list[str] | None) -> str:
    return NOT_MEASURED if names is None else (", ".join(names) or "none")


def _inplace_part(result: DiagnosisResult) -> list[str]:
    bumped = _probe(result, "inplace", "ckpt_reentrant_fixed_lr", "grad_accumulated_in_place")
    surfaced = _probe(result, "inplace", "ckpt_lr_reentrant", "error_in")
    surfaced_1 = _probe(result, "inplace", "ckpt_lr_reentrant_1_step", "error_in")
    bumped_2nd = _probe(result, "inplace", "lr_1_step", "grad_accumulated_in_place")
    blamed = _probe(result, "inplace", "ckpt_lr_reentrant", "anomaly_forward_lines")
    k = result.setup["inner_steps"]
    return [
        "(1) Why multiplying by a learnable LR breaks the backward only with checkpointing (probes `saved_tensor`, "
        "`inplace`):",
        "  `softplus(raw) * param.grad` is MulBackward0, which saves `param.grad` itself (the LR's gradient needs it);",
        "  `0.1 * param.grad` saves only the constant. The next backward that reaches the copy's leaf parameter adds",
        "  into that same `param.grad` tensor: AccumulateGrad does `grad += new` IN PLACE when the backward runs with",
        "  grad mode off (no create_graph), out of place (a new tensor) when it runs with create_graph=True.",
        "  - reentrant checkpoint: its backward re-runs the layer and calls `torch.autograd.backward(...)` WITHOUT",
        "    create_graph, even inside `.backward(create_graph=True)`; so the checkpointed layers' first-step `.grad`",
        f"    goes from version 0 to 1 (this run, `ckpt`: modified in place: {_names(bumped)}). MulBackward0 then",
        "    finds its saved tensor at version 1 -> the error (this run, anomaly mode blames: "
        + (NOT_MEASURED if blamed is None else ", ".join(f"`{ln}`" for ln in blamed) or "no line") + ").",
        f"    With {k} inner steps it surfaced in: {surfaced or NOT_MEASURED}; with 1 inner step: "
        f"{surfaced_1 or NOT_MEASURED}.",
        "  - no checkpoint, second order: the inner backward has create_graph=True (out of place); the outer backward",
        f"    does bump it in place (this run, `lr`, 1 inner step: {_names(bumped_2nd)}) but only after MulBackward0",
        "    used it: `.grad` has a graph back to the parameter, so the parameter's AccumulateGrad waits for that path.",
        "  - first order: every backward runs with grad mode off, `.grad` has no graph -> `lr_fo` raises even without",
        "    checkpointing. With a constant LR the same in-place bumps happen, but nothing saved the tensor.",
    ]


def _routes_part(result: DiagnosisResult) -> list[str]:
    nested = _probe(result, "hook_routes", "block_leaf_hooks_fired_inside_checkpoint_backward")
    ckpt = result.table.get("ckpt", {}).get("seed_reentrant", {}).get("w_rel_err")
    after = _probe(result, "lr_pollution", "lr_rel_err_after_adding_inner_loss_grads")
    before = _probe(result, "lr_pollution", "lr_rel_err")
    return [
        "(2) Why gradients reach the fast weights at all (probes `reentrant_edges`, `hook_routes`):",
        "  not through the outer graph: the reentrant checkpoint's node has one edge, to its input x. Its backward",
        "  re-runs the layer with whatever tensors are in the module's `_parameters` AT BACKWARD TIME (the final fast",
        "  weights; a weight rebound after the forward gets the gradient, the one used gets none) and runs a nested",
        "  `torch.autograd.backward`, which walks the fast weights' own graph (w_k = w_{k-1} - lr * g) down to the",
        "  copy's leaves; their hooks copy it to the original model (this run: hooks fired inside the checkpoint's",
        f"  backward: {NOT_MEASURED if nested is None else nested}).",
        "  The same mechanism makes results wrong: the nested backward has no create_graph, so inner gradients of",
        "  checkpointed layers are constants and second-order terms through them vanish (`ckpt`, this run: w rel err "
        + (NOT_MEASURED if ckpt is None else f"{ckpt:.2g}") + ");",
        "  non-reentrant checkpointing recomputes every inner step's forward again during the outer backward, reading",
        "  the FINAL fast weights (silently wrong); and the inner `.backward()` also accumulates the support losses'",
        "  gradients into the LRs' `.grad` (`lr`, this run: LR rel err "
        + (NOT_MEASURED if before is None else f"{before:.2g}") + ", after adding d(support loss of steps 2..K)/d raw: "
        + (NOT_MEASURED if after is None else f"{after:.2g}") + ").",
    ]


def _fix_part(result: DiagnosisResult) -> list[str]:
    cells = [row["functional"] for row in result.table.values()]
    ok = sum(c["status"] == "ok" for c in cells)
    errs = [e for c in cells for e in (c.get("w_rel_err"), c.get("lr_rel_err")) if e is not None]
    worst = f"{max(errs):.2g}" if errs else "n/a"
    return ["Fix: the functional engine (fast weights as an explicit dict, torch.autograd.grad, harness.checkpoint "
            "with the",
            f"  weights as checkpoint inputs): this run, ok in {ok} of {len(cells)} cells, largest rel err {worst} "
            f"(tolerance {result.tolerance:g})."]


def explanation(result: DiagnosisResult) -> str:
    """The short explanation of the seed report's failures, its figures read from ``result`` (a diagnosis)."""
    return "\n".join(_inplace_part(result) + _routes_part(result) + _fix_part(result))


def _fmt(v: Any) -> str:
    return v[:60] + "..." if isinstance(v, str) and len(v) > 60 else str(v)


def markdown(result: DiagnosisResult) -> str:
    """``diagnosis.md``: the table, the differences from the team's, the probes, the explanation, provenance."""
    table, amp = result.table, result.amp
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
                 + (", gradients unscaled" if amp == "fp16" else "") + f"); `ok` = rel err <= {result.tolerance:g}. "
                 "[vs float64: ...] is the relative error against the functional float64 reference (same initial "
                 "weights and tasks): the precision's own error, for comparison.")
    lines = ["# Diagnosis: the seed's stateful MAML vs the functional engine"
             + (f" (mixed precision: {amp})" if amp != "off" else ""), "",
             f"Command: `{result.command}`  ", f"Device: {result.device}, {precision}, "
             f"{result.setup['inner_steps']} inner steps, inner LR {result.setup['inner_lr']}, "
             f"meta-batch {result.setup['meta_batch']}; torch {result.env['torch']}", "",
             cells, "",
             "| variant | " + " | ".join(ENGINE_TITLES[e] for e in ENGINES) + " |",
             "|---|" + "---|" * len(ENGINES)]
    for variant, row in table.items():
        lines.append(f"| `{variant}` | " + " | ".join(row[e]["text"].replace("|", "\\|") for e in ENGINES) + " |")
    lines += ["", "Differences from the team's table (torch 2.11/2.13): "
              + ("none." if not result.differences else ""), *[f"- {d}" for d in result.differences], "",
              "## Probes (each measured on this run)", ""]
    if not result.probes:
        lines.append("Not run under mixed precision: the probes measure the mechanism in float64 "
                     "(`python -m harness diagnose`, results/diagnosis.md).")
    for name, p in result.probes.items():
        flat = {k: v for k, v in p.items() if k != "holds" and not isinstance(v, dict)}
        lines.append(f"- `{name}`: {'holds' if p.get('holds') else 'DOES NOT HOLD'}"
                     + (" -- " + ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items()) if flat else ""))
        for k, v in p.items():
            if isinstance(v, dict):
                lines.append(f"  - {k}: " + ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items()))
    lines += ["", "## Explanation (short; full version in docs/diagnosis.md)", "", "```", explanation(result), "```", "",
              "## Provenance", "", "```"]
    lines += [f"{k}: {v}" for k, v in result.env.items()]
    lines += ["```", ""]
    return "\n".join(lines)
