"""From stored cells to the ablation's rows, effects and checkpoint checks (plain records, one per table row).

Per variant: the mean over seeds of each seed's mean held-out score, with a t-interval and a bootstrap
interval over seeds.  Per effect (second - first order, learned - fixed inner LR): the per-seed paired
differences, tested with Holm's correction over every effect reported.  Per checkpointed variant: its
curves against its counterpart's on the verified seeds; a cell that diverged is never called identical.
"""
from __future__ import annotations

import math
from typing import Any

from harness.studies.ablation.spec import AblationSpec, counterpart
from harness.studies.ablation.stats import ALPHA, BOOTSTRAP_RESAMPLES, bootstrap_interval, effect_tests, seed_scores, t_interval
from harness.variants import Variant

__all__ = ["METRICS", "checkpoint_checks", "effects", "max_curve_diff", "summarise", "variant_rows"]

# (cell key, label, sign): sign +1 when larger is better
METRICS = (("test_loss", "meta-test loss", -1), ("test_acc", "meta-test accuracy", 1))
CURVE_KEYS = ("train_loss", "curve_test_loss", "test_loss", "curve_test_acc", "test_acc")


def _per_seed(cells: dict, name: str, seeds: range, key: str) -> list[float] | None:
    """Each seed's mean over held-out tasks, or None when a seed diverged or lacks the metric."""
    per_task = []
    for s in seeds:
        c = cells[(name, s)]
        if c["status"] != "ok" or not c.get(key):
            return None
        per_task.append(c[key])
    return seed_scores(per_task).tolist()


def variant_rows(spec: AblationSpec, cells_plan: list[tuple[Variant, str]], cells: dict,
                 metrics: tuple) -> list[dict[str, Any]]:
    rows = []
    for v, role in cells_plan:
        seeds = spec.seeds_for(v.checkpointed)
        per_seed = [cells[(v.name, s)] for s in seeds]
        row: dict[str, Any] = {"variant": v.name, "role": role, **v.flags,
                               "status": "ok" if all(c["status"] == "ok" for c in per_seed) else "diverged",
                               "seeds": len(seeds), "eval_tasks": spec.eval_tasks}
        for key, _, _ in metrics:
            scores = None if v.checkpointed else _per_seed(cells, v.name, seeds, key)
            t, boot = t_interval(scores or []), bootstrap_interval(scores or [])
            row.update({f"{key}_mean": t.mean, f"{key}_t_low": t.low, f"{key}_t_high": t.high,
                        f"{key}_boot_low": boot.low, f"{key}_boot_high": boot.high})
        finals = [c["train_loss"][-1] for c in per_seed if c["train_loss"] and c["status"] == "ok"]
        row["final_train_loss"] = sum(finals) / len(finals) if finals else math.nan
        row["wall_s_per_seed"] = sum(c["wall_s"] for c in per_seed) / len(per_seed)
        row["cpu_s_per_seed"] = sum(c.get("cpu_s", math.nan) for c in per_seed) / len(per_seed)
        rows.append(row)
    return rows


def max_curve_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over every recorded curve of two cells (inf when lengths differ)."""
    d = 0.0
    for key in CURVE_KEYS:
        x, y = a.get(key) or [], b.get(key) or []
        if len(x) != len(y):
            return math.inf
        d = max([d] + [abs(p - q) for p, q in zip(x, y) if p is not None and q is not None])
    return d


def checkpoint_checks(spec: AblationSpec, cells_plan: list[tuple[Variant, str]], cells: dict,
                      counterpart: dict[str, str]) -> list[dict[str, Any]]:
    """Each checkpointed variant against its counterpart on the verified seeds; ``identical`` is None
    (no claim) when either side diverged on any of them."""
    checks = []
    for v, _ in cells_plan:
        if not v.checkpointed:
            continue
        ref, seeds = counterpart[v.name], spec.seeds_for(True)
        pairs = [(cells[(v.name, s)], cells[(ref, s)]) for s in seeds]
        diverged = [s for s, (a, b) in zip(seeds, pairs) if a["status"] != "ok" or b["status"] != "ok"]
        diff = max(max_curve_diff(a, b) for a, b in pairs)
        checks.append({"variant": v.name, "counterpart": ref, "seeds_checked": len(seeds),
                       "seeds_total": spec.seeds, "diverged_seeds": diverged, "max_abs_diff": diff,
                       "identical": None if diverged else diff == 0.0})
    return checks


def _effect_pairs(cells_plan: list[tuple[Variant, str]]) -> list[tuple[str, str, Variant, Variant]]:
    base = {tuple(sorted(v.flags.items())): v for v, _ in cells_plan if not v.checkpointed}

    def partner(v: Variant, **change: Any) -> Variant | None:
        return base.get(tuple(sorted({**v.flags, **change}.items())))

    pairs = []
    for v in base.values():
        exact = {k: x for k, x in v.flags.items() if k not in v.estimator_flags}  # the same variant, exact
        if v.estimator_flags and (b := base.get(tuple(sorted(exact.items())))):
            pairs.append(("estimator", f"exact - {v.estimator}", b, v))
        if not v.first_order and (b := partner(v, first_order=True)):
            pairs.append(("order", "second - first order", v, b))
        if v.learn_lr and (b := partner(v, learn_lr=False, lr_per_step=False)):
            pairs.append(("lr", "learned - fixed inner LR", v, b))
    return pairs


def effects(spec: AblationSpec, cells_plan: list[tuple[Variant, str]], cells: dict, metrics: tuple,
            alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Paired effects between base variants over every seed, Holm-corrected over all effects listed."""
    seeds = spec.seeds_for(False)
    found = []
    for effect, label, a, b in _effect_pairs(cells_plan):
        for key, mname, sign in metrics:
            xa, xb = _per_seed(cells, a.name, seeds, key), _per_seed(cells, b.name, seeds, key)
            diffs = [p - q for p, q in zip(xa, xb)] if xa is not None and xb is not None else []
            found.append(({"effect": effect, "label": label, "a": a.name, "b": b.name, "metric": mname,
                           "seeds": len(diffs)}, sign, diffs))
    rows = []
    for (row, sign, diffs), test in zip(found, effect_tests([d for _, _, d in found], alpha)):
        if not diffs:
            verdict = "not tested: a seed diverged"
        elif test.significant:
            better = row["a"] if sign * test.t.mean > 0 else row["b"]
            verdict = f"{better} better (Holm-adjusted p = {test.p_holm:.2g} < {alpha:g})"
        else:
            verdict = f"no difference shown (Holm-adjusted p = {test.p_holm:.2g})"
        rows.append({**row, "mean_diff": test.t.mean, "t_low": test.t.low, "t_high": test.t.high,
                     "boot_low": test.bootstrap.low, "boot_high": test.bootstrap.high, "p": test.p,
                     "p_holm": test.p_holm, "holm_level": test.holm_level, "holm_low": test.holm.low,
                     "holm_high": test.holm.high, "significant": test.significant, "verdict": verdict})
    return rows


def summarise(spec: AblationSpec, cells_plan: list[tuple[Variant, str]], cells: dict) -> dict[str, Any]:
    """Rows, effects, checks and the curves the plots need, from the cells of ``cells_plan``."""
    classification = any(c.get("test_acc") for c in cells.values())
    metrics = METRICS if classification else METRICS[:1]
    partner = {v.name: counterpart(v).name for v, _ in cells_plan if v.checkpointed}
    checks = checkpoint_checks(spec, cells_plan, cells, partner)
    rows = variant_rows(spec, cells_plan, cells, metrics)
    for row in rows:
        check = next((c for c in checks if c["variant"] == row["variant"]), None)
        row["counterpart"] = check["counterpart"] if check else ""
        row["identical_to_counterpart"] = check["identical"] if check else None
        row["curve_max_abs_diff"] = check["max_abs_diff"] if check else None
    curves = {v.name: {"steps": cells[(v.name, 0)]["curve_steps"], "flags": v.flags,
                       **{key: [cells[(v.name, s)][cell_key] for s in spec.seeds_for(v.checkpointed)]
                          for key, cell_key in (("train_loss", "train_loss"), ("test_loss", "curve_test_loss"),
                                                ("test_acc", "curve_test_acc"))}}
              for v, _ in cells_plan}
    claims = [c["identical"] for c in checks]
    return {"classification": classification, "rows": rows, "effects": effects(spec, cells_plan, cells, metrics),
            "checks": checks, "curves": curves, "correction": "holm", "alpha": ALPHA,
            "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "all_identical": bool(claims) and all(c is True for c in claims)}
