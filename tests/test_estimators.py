"""Claims: every meta-gradient estimator (harness.core.estimators) equals its closed form on a linear model with
a quadratic loss, in float64, to 1e-10; truncated with T = K is exact bit for bit (T = 0 is first order); implicit
converges to the exact meta-gradient of the proximal objective as inner steps and CG steps grow; reptile is
theta - phi_K of an independent SGD loop; what does not compose is refused in one line.

The closed forms use numpy matrix algebra, not the engine: with mse over n rows, the support loss has the constant
Hessian A = 2/n X^T X and gradient A w - b (b = 2/n X^T y), so an inner step is the linear map
w -> M w + alpha b with M = I - alpha A.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from harness.core.config import ConfigError, MetaConfig, Task
from harness.core.engine import MetaLearner
from harness.core.estimators import conjugate_gradient
from tests.zoo.models import ZOO, mse

DIM, ALPHA, LAM = 4, 0.15, 2.0
TOL = 1e-10


def linear_problem(seed: int = 0, tasks: int = 2) -> tuple[nn.Linear, list[Task]]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, DIM, generator=gen, dtype=torch.float64))
    out = []
    for _ in range(tasks):
        xs, xq = (torch.randn(n, DIM, generator=gen, dtype=torch.float64) for n in (7, 5))
        out.append(Task(xs, torch.randn(7, 1, generator=gen, dtype=torch.float64), xq,
                        torch.randn(5, 1, generator=gen, dtype=torch.float64)))
    return model, out


def quadratic(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of mse(x w, y): gradient A w - b."""
    x, y = x.numpy(), y.numpy()[:, 0]
    return 2 / len(x) * x.T @ x, 2 / len(x) * x.T @ y


def sgd_path(theta: np.ndarray, task: Task, steps: int, lam: float = 0.0) -> np.ndarray:
    """phi_K of ``steps`` SGD steps on mse (+ lam/2 |phi - theta|^2) of the support set."""
    a, b = quadratic(task.support_x, task.support_y)
    phi = theta.copy()
    for _ in range(steps):
        phi = phi - ALPHA * (a @ phi - b + lam * (phi - theta))
    return phi


def closed_form(estimator: str, theta: np.ndarray, tasks: list[Task], steps: int, truncate: int = 0,
                lam: float = LAM, proximal_optimum: bool = False) -> np.ndarray:
    """The mean-over-tasks meta-gradient of ``estimator`` by matrix algebra."""
    total = np.zeros(DIM)
    for task in tasks:
        a, _ = quadratic(task.support_x, task.support_y)
        aq, bq = quadratic(task.query_x, task.query_y)
        if estimator == "implicit":
            _, b = quadratic(task.support_x, task.support_y)
            phi = (np.linalg.solve(a + lam * np.eye(DIM), b + lam * theta) if proximal_optimum
                   else sgd_path(theta, task, steps, lam))
            total += np.linalg.solve(np.eye(DIM) + a / lam, aq @ phi - bq)
            continue
        phi = sgd_path(theta, task, steps)
        if estimator == "reptile":
            total += theta - phi
            continue
        back = {"exact": steps, "first_order": 0, "truncated": min(truncate, steps)}[estimator]
        total += np.linalg.matrix_power(np.eye(DIM) - ALPHA * a, back) @ (aq @ phi - bq)
    return total / len(tasks)


def engine_gradient(estimator: str, steps: int, seed: int = 0, **cfg: object) -> tuple[np.ndarray, MetaLearner]:
    model, tasks = linear_problem(seed)
    learner = MetaLearner(model, MetaConfig(inner_steps=steps, inner_lr=ALPHA, estimator=estimator, **cfg), mse)
    grads, _ = learner.meta_gradients(tasks)
    return grads["w.weight"].numpy()[0], learner


@pytest.mark.parametrize("estimator,steps,cfg", [
    ("exact", 3, {}), ("first_order", 3, {}), ("truncated", 5, {"truncate_steps": 2}),
    ("truncated", 3, {"truncate_steps": 7}), ("implicit", 6, {"implicit_lambda": LAM, "cg_steps": DIM}),
    ("reptile", 4, {})])
def test_each_estimator_equals_its_closed_form(estimator: str, steps: int, cfg: dict) -> None:
    got, learner = engine_gradient(estimator, steps, **cfg)
    model, tasks = linear_problem()
    want = closed_form(estimator, model.weight.detach().numpy()[0], tasks, steps,
                       truncate=int(cfg.get("truncate_steps", 0)))
    assert np.abs(got - want).max() <= TOL * max(1.0, np.abs(want).max())
    if estimator == "implicit":
        assert learner.last_cg_residual is not None and learner.last_cg_residual < 1e-8


@pytest.mark.parametrize("model_name", ["layernorm", "dropout"])
def test_truncated_with_all_steps_is_exact_and_with_none_first_order_bit_for_bit(model_name: str) -> None:
    entry = ZOO[model_name]
    torch.manual_seed(0)
    base = entry.build().double()
    tasks = entry.tasks(torch.Generator().manual_seed(3))

    def grads(**cfg: object) -> dict[str, torch.Tensor]:
        learner = MetaLearner(copy.deepcopy(base), MetaConfig(inner_steps=3, inner_lr=0.1, learn_lr=True, **cfg), mse)
        torch.manual_seed(1)
        return learner.meta_gradients(tasks)[0]

    exact, fo = grads(), grads(first_order=True)
    for cfg, want in (({"truncate_steps": 3}, exact), ({"truncate_steps": 5}, exact), ({"truncate_steps": 0}, fo)):
        got = grads(estimator="truncated", **cfg)
        assert all(torch.equal(got[k], want[k]) for k in want), cfg
    middle = grads(estimator="truncated", truncate_steps=1)
    assert not all(torch.equal(middle[k], exact[k]) for k in exact)


def test_implicit_converges_to_the_proximal_meta_gradient_as_inner_and_cg_steps_grow() -> None:
    model, tasks = linear_problem(seed=2)
    want = closed_form("implicit", model.weight.detach().numpy()[0], tasks, 0, proximal_optimum=True)
    errors = []
    for steps, cg in ((1, 1), (3, 2), (10, 3), (40, DIM), (200, DIM)):
        got, _ = engine_gradient("implicit", steps, seed=2, implicit_lambda=LAM, cg_steps=cg)
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9, errors


def test_reptile_is_theta_minus_phi_of_an_independent_sgd_loop() -> None:
    entry = ZOO["layernorm"]
    torch.manual_seed(0)
    model = entry.build().double()
    tasks = entry.tasks(torch.Generator().manual_seed(3))
    learner = MetaLearner(copy.deepcopy(model), MetaConfig(inner_steps=3, inner_lr=0.1, estimator="reptile"), mse)
    got, _ = learner.meta_gradients(tasks)
    want = {f"w.{n}": torch.zeros_like(p) for n, p in model.named_parameters()}
    for task in tasks:
        copy_ = copy.deepcopy(model)
        opt = torch.optim.SGD(copy_.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            mse(copy_(task.support_x), task.support_y).backward()
            opt.step()
        for (n, p), q in zip(model.named_parameters(), copy_.parameters()):
            want[f"w.{n}"] += (p - q).detach() / len(tasks)
    assert set(got) == set(want)
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-13) for k in want)
    assert any(want[k].abs().max() > 1e-3 for k in want)


@pytest.mark.parametrize("cfg,words", [
    ({"estimator": "implicit", "learn_lr": True}, "cannot learn inner LRs"),
    ({"estimator": "reptile", "learn_lr": True}, "cannot learn inner LRs"),
    ({"estimator": "implicit", "step_ckpt": 1}, "no step to checkpoint"),
    ({"estimator": "reptile", "snapshots": 2}, "no step to checkpoint"),
    ({"estimator": "implicit", "adapt_last": 1}, "adapt_last=None"),
    ({"estimator": "reptile", "amp": "bf16"}, "amp='off'"),
    ({"estimator": "truncated", "vectorize": True}, "vectorize=0"),
    ({"estimator": "implicit", "first_order": True}, "first_order=True is the first_order estimator"),
    ({"estimator": "newton"}, "valid choices: exact, first_order, truncated, implicit, reptile"),
    ({"estimator": "truncated", "truncate_steps": -1}, "truncate_steps must be"),
    ({"estimator": "implicit", "implicit_lambda": 0.0}, "implicit_lambda must be"),
    ({"estimator": "implicit", "cg_steps": 0}, "cg_steps must be")])
def test_what_does_not_compose_is_refused_in_one_line(cfg: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        MetaConfig(inner_steps=2, **cfg)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_first_order_and_the_first_order_estimator_are_one_setting() -> None:
    assert MetaConfig(first_order=True).estimator == "first_order"
    assert MetaConfig(estimator="first_order").first_order is True
    assert MetaConfig().estimator == "exact" and MetaConfig().first_order is False
    assert MetaConfig(estimator="truncated").exact() == MetaConfig()
    fo = MetaConfig(first_order=True)
    assert replace(fo, first_order=False) == MetaConfig() and replace(MetaConfig(), first_order=True) == fo


def _matvec(matrix: np.ndarray):
    return lambda v: [torch.from_numpy(matrix @ v[0].numpy())]


def test_conjugate_gradient_solves_a_positive_definite_system_and_stops_at_negative_curvature() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    b = [torch.from_numpy(rng.standard_normal(DIM))]
    spd = q @ np.diag([0.5, 1.0, 2.0, 4.0]) @ q.T
    x, residual = conjugate_gradient(_matvec(spd), b, DIM)
    assert np.abs(x[0].numpy() - np.linalg.solve(spd, b[0].numpy())).max() < 1e-12 and residual < 1e-12
    negative = q @ np.diag([-3.0, -2.0, -1.0, -0.5]) @ q.T  # b^T A b < 0 at the first iteration: x = b
    x, residual = conjugate_gradient(_matvec(negative), b, DIM)
    assert torch.equal(x[0], b[0])
    want = np.linalg.norm(b[0].numpy() - negative @ b[0].numpy()) / np.linalg.norm(b[0].numpy())
    assert abs(residual - want) < 1e-12 and residual > 1
