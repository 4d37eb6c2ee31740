"""Comparing meta-gradients: the agreement figure every cell and test reports.

``agreement`` pairs two gradient dicts by name (``w.<param>`` and ``lr.<key>``) and gives the relative
error and cosine for the initial weights and the learnable LRs separately.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

__all__ = ["agreement", "split_grads"]


def split_grads(grads: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(initial-weight gradients, LR gradients) from :meth:`MetaLearner.meta_gradients`."""
    w = {k: v for k, v in grads.items() if k.startswith("w.")}
    lr = {k: v for k, v in grads.items() if k.startswith("lr.")}
    return w, lr


def _flat(ts: Mapping[str, Tensor]) -> Tensor:
    """All values as one float64 vector; a complex tensor contributes its real and imaginary parts."""
    parts = [(torch.view_as_real(t.detach()) if t.is_complex() else t.detach()).reshape(-1).double() for t in ts.values()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def agreement(grads: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, float | None]:
    """Relative error ``|g - g_ref| / |g_ref|`` and cosine, for weights and LRs separately."""
    out: dict[str, float | None] = {}
    (w, lr), (w_ref, lr_ref) = split_grads(grads), split_grads(reference)
    for part, a, b in (("w", w, w_ref), ("lr", lr, lr_ref)):
        if not b:
            out[f"{part}_rel_err"] = out[f"{part}_cosine"] = None
            continue
        if set(a) != set(b):
            raise ValueError(f"agreement: gradient keys differ: {sorted(set(a) ^ set(b))}")
        fa, fb = _flat({k: a[k] for k in b}), _flat(b)  # pair by name, not by dict order
        ref_norm, diff = fb.norm().item(), (fa - fb).norm().item()
        out[f"{part}_rel_err"] = diff / ref_norm if ref_norm > 0 else diff
        denom = fa.norm().item() * ref_norm
        out[f"{part}_cosine"] = (fa @ fb).item() / denom if denom > 0 else (1.0 if diff == 0 else 0.0)
    return out
