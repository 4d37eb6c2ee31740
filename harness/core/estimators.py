"""Meta-gradient estimators beside the exact one (``MetaConfig.estimator``), and what each computes.

With theta the initial weights, phi_k the fast weights after k inner steps of SGD with step size alpha on the
support loss L_s, and L_q the query loss:

* ``exact`` -- d L_q(phi_K) / d theta through all K inner steps (second order).
* ``first_order`` (FOMAML, ``first_order=True``) -- every inner gradient is a constant: grad L_q(phi_K) for the
  weights (the learnable LRs still get theirs through ``lr * g``).
* ``truncated`` -- back-propagation through the last T = ``truncate_steps`` inner steps only: steps
  0..K-T-1 are first order (their inner gradients constants, so d phi_{K-T} / d theta = I and the learnable
  LRs of those steps still get a first-order gradient), steps K-T..K-1 keep their graph (second order).  For the
  weights that is ``prod_{k=K-T}^{K-1} (I - alpha H_k)^T grad L_q(phi_K)``; T >= K is ``exact`` (the same
  operations, bit for bit), T = 0 is ``first_order``.  It composes with every checkpointing: the choice is per
  step, inside ``MetaLearner.inner_loop`` (:func:`second_order_step`).
* ``implicit`` (iMAML, Rajeswaran et al. 2019) -- the inner loop runs K SGD steps (values only) on the proximal
  objective ``L_s(phi) + lambda/2 |phi - theta|^2`` from phi_0 = theta; at its minimiser phi*,
  d phi*/d theta = (I + H/lambda)^{-1} with H the Hessian of L_s, so the meta-gradient is v solving
  ``(I + H/lambda) v = grad L_q(phi_K)``, found by ``cg_steps`` conjugate-gradient iterations with
  Hessian-vector products of L_s at phi_K (memory independent of K).  The CG residual |g - (I + H/lambda) v| / |g|
  (CG's own recurrence; the largest over the meta-batch) is ``MetaLearner.last_cg_residual``.  The estimate is
  exact for the proximal objective only as the inner loop converges (phi_K -> phi*) and CG converges.
* ``reptile`` (Nichol et al. 2018) -- not a gradient: the update direction ``theta - phi_K`` of K plain SGD
  steps on the support set, unscaled (an outer SGD step of size epsilon is Reptile's ``theta + epsilon
  (phi_K - theta)``); its relative error against ``exact`` measures a direction, only its cosine compares.

implicit and reptile refuse learnable LRs, step checkpointing, ``adapt_last`` and mixed precision
(``MetaConfig._check_path_free`` says why); every estimator but ``exact``/``first_order`` refuses ``vectorize``.
Tests: ``python -m pytest tests/test_estimators.py`` (each against a closed form).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from harness.core.config import MetaConfig, Task, Weights
from harness.core.update import sgd_update

if TYPE_CHECKING:  # pragma: no cover
    from harness.core.engine import MetaLearner

__all__ = ["conjugate_gradient", "path_free_meta_gradients", "proximal_adapt", "reptile_adapt", "second_order_step"]


def second_order_step(cfg: MetaConfig, step: int) -> bool:
    """Does inner step ``step`` keep its graph for the outer backward (its inner gradient differentiated)?"""
    if cfg.first_order:
        return False
    if cfg.estimator == "truncated":
        return step >= cfg.inner_steps - cfg.truncate_steps
    return True


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(((x * y).sum() for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device))


def conjugate_gradient(matvec: Callable[[list[Tensor]], list[Tensor]], b: Sequence[Tensor], steps: int
                       ) -> tuple[list[Tensor], float]:
    """``steps`` CG iterations for ``A x = b`` (A symmetric, given by ``matvec``) from x = 0; returns x and the
    relative residual |b - A x| / |b| of CG's recurrence (0 when b = 0).

    A direction of non-positive curvature (p^T A p <= 0: A is not positive definite, as I + H/lambda is not when
    the support loss has a Hessian eigenvalue below -lambda) stops the iterations there, as truncated-Newton CG
    does; at the first iteration x is then b itself (A taken as I).  The residual reports how far off that is."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    b_norm = _dot(b, b).sqrt().item()
    rr = _dot(r, r)
    for i in range(steps):
        if rr.item() == 0.0:
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        if curvature.item() <= 0:
            if i == 0:  # p = b, so the residual of x = b is b - A b
                x, r = [t.clone() for t in b], [bi - ai for bi, ai in zip(b, ap)]
                rr = _dot(r, r)
            break
        alpha = rr / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rr_next = _dot(r, r)
        p = [ri + (rr_next / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_next
    return x, (rr.sqrt().item() / b_norm if b_norm > 0 else 0.0)


def _leaves(learner: "MetaLearner", weights: Weights) -> Weights:
    """Detached copies of ``weights``; the adapted ones require grad (inner gradients are taken on them)."""
    adapted = set(learner.adapted)
    return {n: t.detach().requires_grad_(n in adapted) for n, t in weights.items()}


def _inner_grads(learner: "MetaLearner", weights: Weights, x: Tensor, y: Tensor, create_graph: bool = False
                 ) -> dict[str, Tensor]:
    loss = learner.loss_with(weights, x, y)
    grads = torch.autograd.grad(loss, [weights[n] for n in learner.adapted], create_graph=create_graph,
                                allow_unused=True, materialize_grads=True)
    return dict(zip(learner.adapted, grads))


def proximal_adapt(learner: "MetaLearner", theta: Weights, x: Tensor, y: Tensor) -> Weights:
    """K SGD steps (values only) on ``L_s(phi) + lambda/2 |phi - theta|^2`` from phi_0 = theta."""
    lam, lr = learner.cfg.implicit_lambda, learner.cfg.inner_lr
    phi = _leaves(learner, theta)
    for _ in range(learner.cfg.inner_steps):
        grads = {n: g + lam * (phi[n].detach() - theta[n]) for n, g in _inner_grads(learner, phi, x, y).items()}
        phi = _leaves(learner, sgd_update({n: t.detach() for n, t in phi.items()}, grads, lambda n: lr))
    return {n: t.detach() for n, t in phi.items()}


def reptile_adapt(learner: "MetaLearner", theta: Weights, x: Tensor, y: Tensor) -> Weights:
    """K plain SGD steps (values only) on the support loss from theta: the engine's own inner loop, step by step."""
    phi = _leaves(learner, theta)
    for k in range(learner.cfg.inner_steps):
        phi = _leaves(learner, learner.inner_loop(phi, None, x, y, range(k, k + 1), build_graph=False))
    return {n: t.detach() for n, t in phi.items()}


def _implicit_task(learner: "MetaLearner", theta: Weights, task: Task) -> tuple[dict[str, Tensor], float, float]:
    """One task's implicit meta-gradient, query loss and CG residual."""
    phi = _leaves(learner, proximal_adapt(learner, theta, task.support_x, task.support_y))
    query_loss = learner.loss_with(phi, task.query_x, task.query_y)
    names = learner.adapted
    g = torch.autograd.grad(query_loss, [phi[n] for n in names], allow_unused=True, materialize_grads=True)
    support_grads = _inner_grads(learner, phi, task.support_x, task.support_y, create_graph=True)
    lam = learner.cfg.implicit_lambda

    def matvec(v: list[Tensor]) -> list[Tensor]:
        hv = torch.autograd.grad([support_grads[n] for n in names], [phi[n] for n in names], grad_outputs=v,
                                 retain_graph=True, allow_unused=True, materialize_grads=True)
        return [vi + hvi / lam for vi, hvi in zip(v, hv)]

    v, residual = conjugate_gradient(matvec, [t.detach() for t in g], learner.cfg.cg_steps)
    return dict(zip(names, v)), query_loss.item(), residual


def _reptile_task(learner: "MetaLearner", theta: Weights, task: Task) -> tuple[dict[str, Tensor], float, None]:
    """One task's direction theta - phi_K and the query loss at phi_K."""
    phi = reptile_adapt(learner, theta, task.support_x, task.support_y)
    with torch.no_grad():
        query_loss = learner.loss_with(phi, task.query_x, task.query_y).item()
    return {n: theta[n] - phi[n] for n in learner.adapted}, query_loss, None


def path_free_meta_gradients(learner: "MetaLearner", tasks: list[Task]
                             ) -> tuple[dict[str, Tensor], float, float | None]:
    """Mean-over-tasks meta-gradients (``w.<name>``) of ``implicit`` or ``reptile``, the mean query loss and the
    largest CG residual (None for reptile)."""
    theta = {n: p.detach() for n, p in learner.initial_weights().items()}
    per_task = _implicit_task if learner.cfg.estimator == "implicit" else _reptile_task
    params = learner.meta_parameters()
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    losses, residuals = [], []
    for task in tasks:
        grads, loss, residual = per_task(learner, theta, task)
        for n, g in grads.items():
            total[f"w.{n}"].add_(g / len(tasks))
        losses.append(loss)
        residuals.append(residual)
    worst = max((r for r in residuals if r is not None), default=None)
    return total, sum(losses) / max(len(losses), 1), worst
