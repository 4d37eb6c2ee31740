"""Which peer can express which cell, and why not: decided without importing a peer's package
beyond checking that it imports (``available``).

Run ``python -m harness list`` for the variants; a peer cell is ``<peer>:<variant>`` (``torch_maml:sckpt``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterable

from harness.core.config import AMP_MODES, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from harness.variants import Variant

__all__ = ["NO_CKPT", "NO_ESTIMATOR", "NO_FIRST_ORDER", "NO_FP16", "NO_LAYER_CKPT", "NO_LEARN_LR", "NO_LEARN_LR_TORCH_MAML",
           "NO_SCHEDULE", "NO_VECTORIZE", "PEERS", "VERSIONS", "available", "cell_name", "cells", "check_peer",
           "supports"]

PEERS = ("higher", "torchopt", "torch_maml")
VERSIONS = {"higher": "0.2.1", "torchopt": "0.7.3", "torch_maml": "1.0"}
NO_CKPT = "no gradient checkpointing"
NO_LAYER_CKPT = "no per-layer checkpointing (torch-maml checkpoints whole chunks of inner steps only)"
NO_VECTORIZE = "no vectorized tasks (the adapter loops over the meta-batch's tasks one at a time)"
NO_LEARN_LR = "no learnable inner LR (torchopt.sgd takes one fixed scalar LR per transformation)"
NO_LEARN_LR_TORCH_MAML = ("no learnable per-layer inner LR (IngraphGradientDescent takes one fixed learning_rate; "
                          "IngraphRMSProp's learnable one is a single scalar)")
NO_SCHEDULE = ("no binomial or one-step-at-a-time step checkpointing (torch-maml rebuilds whole chunks of inner "
               "steps)")
NO_FIRST_ORDER = ("no first order (torch-maml's detach=True detaches the updated weights themselves, so no gradient "
                  "reaches the initial weights)")
NO_ESTIMATOR = ("no truncated, implicit or reptile estimator (the adapters differentiate the whole inner loop: "
                "exact or first order only)")
NO_FP16 = ("fp16 loss scaling through the peer's inner loop is not wired (higher could via grad_callback, "
           "torchopt via a custom transformation); bf16 autocast only")


def check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise ConfigError(f"unknown peer {peer!r}; valid peers: {', '.join(PEERS)}")


def available(peer: str) -> tuple[bool, str]:
    """Is the peer's package importable?  ``(False, reason)`` names the extra to install."""
    check_peer(peer)
    try:
        importlib.import_module(peer)
    except Exception as exc:  # ImportError, or a peer that breaks on this torch
        return False, f"{peer} is not importable ({type(exc).__name__}: {exc}); pip install '.[peers]'"
    return True, ""


def supports(peer: str, variant: "Variant", amp: str = "off") -> tuple[bool, str]:
    """Can ``peer`` express ``variant`` (under precision ``amp``) exactly?  ``(False, reason)`` when not."""
    check_peer(peer)
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown precision {amp!r}; valid choices: {', '.join(AMP_MODES)}")
    if peer == "torch_maml":
        return _supports_torch_maml(variant, amp)
    if variant.layer_ckpt or variant.step_ckpt or getattr(variant, "snapshots", 0):
        return False, NO_CKPT
    if getattr(variant, "vectorize", False):
        return False, NO_VECTORIZE
    if getattr(variant, "estimator", "exact") != "exact":
        return False, NO_ESTIMATOR
    if peer == "torchopt" and (variant.learn_lr or variant.lr_per_step):
        return False, NO_LEARN_LR
    if amp == "fp16":
        return False, NO_FP16
    return True, ""


def _supports_torch_maml(variant: "Variant", amp: str) -> tuple[bool, str]:
    """Second order with one fixed LR, with or without step checkpoints (GradientCheckpointMAML)."""
    schedule = getattr(variant, "snapshots", 0) or getattr(variant, "step_rebuild", "segment") != "segment"
    for refused, reason in ((variant.layer_ckpt, NO_LAYER_CKPT), (schedule, NO_SCHEDULE),
                            (getattr(variant, "vectorize", False), NO_VECTORIZE),
                            (getattr(variant, "estimator", "exact") != "exact", NO_ESTIMATOR),
                            (variant.learn_lr or variant.lr_per_step, NO_LEARN_LR_TORCH_MAML),
                            (variant.first_order, NO_FIRST_ORDER), (amp == "fp16", NO_FP16)):
        if refused:
            return False, reason
    return True, ""


def cell_name(peer: str, variant: "Variant | str") -> str:
    """``higher:<variant>`` / ``torchopt:<variant>`` / ``torch_maml:<variant>``."""
    check_peer(peer)
    return f"{peer}:{variant if isinstance(variant, str) else variant.name}"


def cells(variants: Iterable["Variant"], amp: str = "off") -> list[dict[str, object]]:
    """Every (peer, variant) cell with ``supported`` and ``reason``; unsupported ones are listed, not dropped."""
    out = []
    for v in variants:
        for peer in PEERS:
            ok, reason = supports(peer, v, amp)
            if ok:
                present, why = available(peer)
                if not present:
                    ok, reason = False, why
            out.append({"cell": cell_name(peer, v), "peer": peer, "variant": v.name,
                        "supported": ok, "reason": reason})
    return out
