"""Upstream PyTorch defects that change meta-gradients, pinned so that we notice when they are fixed.

Claim: in torch 2.14.1 the double backward of ``torch._weight_norm`` (what
``torch.nn.utils.parametrizations.weight_norm`` calls) is wrong on the CPU, while the same formula written
out passes ``gradgradcheck``.  Second-order MAML differentiates through the inner gradient, so every
second-order variant -- ours and every peer's -- gets a wrong meta-gradient through weight norm (the zoo's
finite-difference test measures 1e-2 relative).  When this test starts failing, the bug is fixed: drop the
weight-norm entries from ``OPEN_GAPS`` in tests/test_zoo_finite_differences.py and the note in
docs/checkpointing.md.

    python -m pytest tests/test_upstream.py
"""
from __future__ import annotations

import torch

DT = torch.float64


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    g = (torch.rand(3, 1, generator=gen, dtype=DT) + 0.5).requires_grad_()
    v = torch.randn(3, 3, generator=gen, dtype=DT).requires_grad_()
    return x, g, v


def test_weight_norm_written_out_has_a_correct_second_derivative() -> None:
    x, g, v = _inputs()
    assert torch.autograd.gradgradcheck(lambda g, v: (x @ (v * (g / v.norm(dim=1, keepdim=True))).T).pow(2).sum(),
                                        (g, v))


def test_torch_weight_norm_second_derivative_is_still_wrong_upstream() -> None:
    x, g, v = _inputs()
    ok = torch.autograd.gradgradcheck(lambda g, v: (x @ torch._weight_norm(v, g, 0).T).pow(2).sum(), (g, v),
                                      raise_exception=False)
    assert not ok, "torch._weight_norm's double backward is correct now: remove the weight-norm open gaps"
