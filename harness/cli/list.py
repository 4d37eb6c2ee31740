"""``python -m harness list``: the registered variants with their flags (order: second, first, or the estimator),
and the presets."""
from __future__ import annotations

import argparse

from harness.variants import registry
from harness.zoo.presets import PRESETS

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="show the variants and presets")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    print(f"{'variant':<18} {'ckpt':>5} {'lr':>5} {'order':>9} {'step_ckpt':>9} {'vmap':>5}  description")
    for v in registry().values():  # order: the meta-gradient (second, first, or the estimator: truncated, ...)
        order = "first" if v.first_order else "second" if v.estimator == "exact" else v.estimator
        print(f"{v.name:<18} {'yes' if v.layer_ckpt else '-':>5} {'yes' if v.learn_lr else '-':>5} "
              f"{order:>9} {v.step_ckpt or '-':>9} {'yes' if v.vectorize else '-':>5}"
              f"  {v.description}")
    print()
    print(f"{'preset':<18} description")
    for p in PRESETS.values():
        print(f"{p.name:<18} {p.description}")
    return 0
