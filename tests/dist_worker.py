"""Every registered variant trained for 3 meta-steps, as one process or as one rank of a torchrun group.

``tests/test_distributed.py`` launches it once for all cases (one launch, not one per variant)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT_DIR

and compares each rank's ``OUT_DIR/rank<r>.pt`` with :func:`train_case` run in one process.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by torchrun

from harness.loop import distributed  # noqa: E402
from harness.loop.spec import Experiment, RunSpec
from harness.loop.train import meta_step, train  # noqa: E402
from harness.variants import get_variant, registry  # noqa: E402

__all__ = ["Case", "cases", "train_case", "META_STEPS"]

META_STEPS = 3
CONV4_SMALL = ({"channels": 8, "image_size": 16}, {"size": 16, "query": 2})


class Case(NamedTuple):
    name: str
    variant: str
    preset: str = "quick"
    meta_batch: int = 5  # odd: 3 tasks on rank 0, 2 on rank 1
    lr_per_step: bool = False
    amp: str = "off"  # fp16: float32 under autocast with a CPU GradScaler


def cases() -> list[Case]:
    out = [Case(f"{v}-mb5", v) for v in registry()]
    out += [Case("lr-mb4", "lr", meta_batch=4), Case("lr_per_step-mb5", "lr", lr_per_step=True),
            Case("ckpt_sckpt_lr_per_step-mb3", "ckpt_sckpt_lr", meta_batch=3, lr_per_step=True),
            Case("conv4_bn-ckpt_lr-mb3", "ckpt_lr", preset="conv4", meta_batch=3),
            Case("fp16-lr-mb3", "lr", preset="cpu-bench", meta_batch=3, amp="fp16")]
    return out


def _experiment(case: Case) -> Experiment:
    variant = replace(get_variant(case.variant), lr_per_step=case.lr_per_step)
    model_kw, task_kw = CONV4_SMALL if case.preset == "conv4" else ({}, {})
    if case.preset == "cpu-bench":
        model_kw, task_kw = {"width": 16, "depth": 2}, {"sequences": 2, "tokens": 4}
    spec = RunSpec(variant=case.variant, preset=case.preset, dtype="float32" if case.amp != "off" else "float64",
                   meta_batch=case.meta_batch, meta_steps=META_STEPS, inner_steps=2)
    exp = Experiment(spec, variant=variant, model_overrides=model_kw or None, task_overrides=task_kw or None)
    group = distributed.current()
    if group is not None and group.rank != 0:  # as if each rank had initialised differently: rank 0's must win
        with torch.no_grad():
            for p in exp.learner.parameters():
                p.add_(0.1 * (group.rank + 1))
    return exp


def train_case(case: Case) -> dict[str, object]:
    """Parameters (initial weights and LRs), losses and skipped steps after META_STEPS meta-steps."""
    exp = _experiment(case)
    if case.amp == "fp16":  # CPU GradScaler: train() builds one only on CUDA; the first step overflows
        exp.learner.cfg = replace(exp.learner.cfg, amp="fp16")
        group = distributed.current()
        if group is not None:
            group.broadcast_module(exp.learner)
        opt = torch.optim.Adam(exp.learner.parameters(), lr=exp.sizes["outer_lr"])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -112)
        steps = [meta_step(exp.learner, opt, scaler, exp.sample()) for _ in range(META_STEPS)]
        losses, skipped = [s[0] for s in steps], [s[1] for s in steps]
        extra = {"scale": scaler.get_scale()}
    else:
        log = train(exp, META_STEPS)
        losses, skipped, extra = log.losses, [], {}
    params = {n: p.detach().clone() for n, p in exp.learner.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in exp.learner.named_buffers()}
    return {"params": params, "buffers": buffers, "losses": losses, "skipped": skipped, **extra}


def main(out_dir: str) -> int:
    torch.set_num_threads(1)
    with distributed.session("cpu") as group:
        rank = 0 if group is None else group.rank
        results = {case.name: train_case(case) for case in cases()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
