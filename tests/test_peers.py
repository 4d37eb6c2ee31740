"""Claim: for every variant a peer (higher 0.2.1, torchopt 0.7.3, torch-maml 1.0) can express, our
meta-gradients -- of the variant itself and of its checkpointed counterparts
(e.g. ``ckpt_lr`` and ``sckpt_lr`` against higher's ``lr``) -- equal the peer's
in float64, relative error <= 1e-10 for the initial weights and the LRs, on
models the engine was not developed on: a small conv4 with BatchNorm and with
GroupNorm, and the pre-norm residual block stack.  Cells a peer cannot express
are reported unsupported with a reason, never dropped.

The peer tests skip with the reason when the ``peers`` extra is absent
(``pip install '.[peers]'``); the ``supports`` tests need neither package.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from harness.core.ckpt import layer_checkpointing
from harness.core.config import ConfigError
from harness.core.engine import MetaLearner
from harness.core.grads import agreement
from harness.peers import (NO_CKPT, NO_ESTIMATOR, NO_FIRST_ORDER, NO_LAYER_CKPT, NO_LEARN_LR_TORCH_MAML, NO_VECTORIZE,
                                   PEERS, build_peer, cell_name, cells, peer_agreement, supports)
from harness.variants import CANONICAL, Variant, registry
from tests.conftest import small_experiment

TOL = 1e-10
FO_PEERS = ("higher", "torchopt")  # the peers with a first-order mode (torch-maml has none)
INNER_STEPS = 3
# name -> (preset, model overrides): conv4 8 ch 16x16 with BatchNorm / GroupNorm, ResMLP width 16 depth 2
MODELS = {"conv4-bn": ("conv4", {"norm": "batch"}),
          "conv4-gn": ("conv4", {"norm": "group"}),
          "resmlp": ("cpu-bench", {})}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The cells are tiny: one intra-op thread avoids OpenMP spin contention on a shared 2-core machine
    (measured: 2 min wall with 2 threads under load vs 13 s with 1).  Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _need(peer: str) -> None:
    pytest.importorskip(peer, reason=f"{peer} not installed: the peer-oracle tests need pip install '.[peers]'")


def _peer_variant(ours: Variant) -> Variant:
    """The variant a peer runs against ``ours``: same order and LRs, no checkpointing."""
    return ours.reference()


# ours: every canonical variant on every model; the step-checkpointed ones on the residual stack
OURS = {model: [n for n in registry() if n in CANONICAL or (model == "resmlp" and registry()[n].step_ckpt)]
        for model in MODELS}


def _peer_name(name: str) -> str:
    """The registered non-checkpointed variant with the same flags (``ckpt_lr`` -> ``lr``)."""
    want = _peer_variant(registry()[name]).flags
    return next(n for n, v in registry().items() if v.flags == want)


def _pairs() -> list[tuple[str, str, str]]:
    return [(peer, name, model) for model, names in OURS.items() for name in names for peer in PEERS
            if supports(peer, _peer_variant(registry()[name]))[0]]


def _restore(exp, buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in exp.learner.named_buffers():
            b.copy_(buffers[n])


def _exp(variant: str, model: str, inner_steps: int = INNER_STEPS):
    preset, overrides = MODELS[model]
    return small_experiment(variant, preset, inner_steps=inner_steps, **overrides)


@lru_cache(maxsize=None)
def _grads(who: str, variant: str, model: str):
    """Meta-gradients (detached copies), loss and initial state of a fresh cell (seed 0: same weights,
    LRs, buffers and tasks whatever the variant); ``who`` is 'ours' or a peer.  Cached: each peer
    cell runs once and is compared with every one of our variants that maps to it."""
    exp = _exp(variant, model)
    initial = {k: v.detach().clone() for k, v in exp.learner.state_dict().items()}
    tasks = exp.sample()
    learner = exp.learner if who == "ours" else build_peer(who, registry()[variant], exp)
    grads, loss = learner.meta_gradients(tasks)
    return grads, loss, initial


@pytest.mark.parametrize("peer,variant,model", _pairs())
def test_our_meta_gradients_equal_the_peers(peer: str, variant: str, model: str) -> None:
    _need(peer)
    ours, ours_loss, ours_init = _grads("ours", variant, model)
    theirs, peer_loss, peer_init = _grads(peer, _peer_name(variant), model)
    for k in peer_init:  # same initial weights, LRs and buffers
        assert torch.equal(ours_init[k], peer_init[k]), k
    assert theirs.keys() == ours.keys()
    agree = agreement(ours, theirs)
    assert agree["w_rel_err"] <= TOL, agree
    if registry()[variant].learn_lr:
        assert agree["lr_rel_err"] <= TOL, agree
        assert any(g.abs().sum() > 0 for k, g in theirs.items() if k.startswith("lr."))
    else:
        assert agree["lr_rel_err"] is None
    assert abs(ours_loss - peer_loss) <= TOL * max(1.0, abs(ours_loss))


def _ours_and_peer(peer: str, variant: str, model: str, inner_steps: int = INNER_STEPS):
    """Ours then the peer on one shared cell, buffers restored in between."""
    exp = _exp(variant, model, inner_steps)
    tasks = exp.sample()
    buffers = {n: b.clone() for n, b in exp.learner.named_buffers()}
    ours, _ = exp.learner.meta_gradients(tasks)
    after_ours = {n: b.clone() for n, b in exp.learner.named_buffers()}
    _restore(exp, buffers)  # the peer starts from the same running statistics
    theirs, _ = build_peer(peer, _peer_variant(exp.variant), exp).meta_gradients(tasks)
    after_peer = {n: b.clone() for n, b in exp.learner.named_buffers()}
    return (ours, after_ours), (theirs, after_peer)


@pytest.mark.parametrize("peer", FO_PEERS)
def test_peer_sees_and_leaves_the_same_batchnorm_buffers(peer: str) -> None:
    _need(peer)
    (ours, after_ours), (theirs, after_peer) = _ours_and_peer(peer, "ckpt_fo", "conv4-bn", inner_steps=2)
    assert agreement(ours, theirs)["w_rel_err"] <= TOL
    running = [n for n in after_ours if "running_mean" in n]
    assert running, "conv4-bn has BatchNorm running statistics"
    for n in after_ours:
        assert torch.equal(after_ours[n], after_peer[n]), n


@pytest.mark.parametrize("peer", FO_PEERS)
def test_peer_first_order_is_fomaml_not_second_order(peer: str) -> None:
    """The FO peer differs from the SO peer and still gives the initial weights a gradient."""
    _need(peer)
    exp = small_experiment("maml", "cpu-bench", inner_steps=2)
    tasks = exp.sample()
    so, _ = build_peer(peer, registry()["maml"], exp).meta_gradients(tasks)
    fo, _ = build_peer(peer, registry()["fo"], exp).meta_gradients(tasks)
    assert agreement(fo, so)["w_rel_err"] > 1e-6
    assert all(g.abs().sum() > 0 for g in fo.values())


@pytest.mark.parametrize("variant,granularity,per_step", [("lr", "tensor", False), ("ckpt_lr", "element", True),
                                                         ("sckpt_lr_fo", "element", False), ("lr_fo", "layer", True)])
def test_higher_expresses_every_lr_granularity(granularity: str, per_step: bool, variant: str) -> None:
    _need("higher")
    exp = small_experiment(variant, "cpu-bench", inner_steps=2)
    cfg = replace(exp.learner.cfg, lr_granularity=granularity, lr_per_step=per_step)
    exp.learner = MetaLearner(exp.learner.model, cfg, exp.learner.loss_fn)
    tasks = exp.sample()
    ours, _ = exp.learner.meta_gradients(tasks)
    peer = build_peer("higher", replace(exp.variant.reference(), lr_per_step=per_step), exp)
    theirs, _ = peer.meta_gradients(tasks)
    agree = agreement(ours, theirs)
    assert agree["w_rel_err"] <= TOL and agree["lr_rel_err"] <= TOL, agree


@pytest.mark.parametrize("peer", PEERS)
def test_peer_step_fills_grad_of_the_shared_parameters(peer: str) -> None:
    _need(peer)
    name = "lr" if peer == "higher" else "maml"
    exp = small_experiment(name, "cpu-bench", inner_steps=2)
    tasks = exp.sample()
    p = build_peer(peer, registry()[name], exp)
    assert [id(t) for t in p.parameters()] == [id(t) for t in exp.learner.parameters()]
    grads, _ = p.meta_gradients(tasks)
    loss = p.step(tasks)
    assert loss > 0
    for k, t in exp.learner.meta_parameters().items():
        assert torch.equal(t.grad, grads[k]), k


def test_supports_marks_unsupported_cells_with_reasons() -> None:
    reg = registry()
    for name in CANONICAL:
        v = reg[name]
        if v.checkpointed:
            assert supports("higher", v) == (False, NO_CKPT)
            assert supports("torchopt", v) == (False, NO_CKPT)
            continue
        assert supports("higher", v) == (True, "")
        ok, reason = supports("torchopt", v)
        assert ok == (not v.learn_lr)
        assert ok or "learnable inner LR" in reason
    for v in reg.values():  # step checkpointing, the estimators and any plugin variant get an answer too
        ok, reason = supports("higher", v)
        assert ok == (not v.checkpointed and not v.vectorize and v.estimator == "exact")
        assert ok or reason == (NO_CKPT if v.checkpointed else NO_VECTORIZE if v.vectorize else NO_ESTIMATOR)
    with pytest.raises(ConfigError, match="valid peers"):
        supports("learn2learn", reg["maml"])


def test_cells_list_every_pair_and_drop_none() -> None:
    variants = [registry()[n] for n in CANONICAL]
    listed = cells(variants)
    assert [c["cell"] for c in listed] == [cell_name(p, v) for v in variants for p in PEERS]
    for c in listed:
        assert c["supported"] or c["reason"], c
    unsupported = {c["cell"] for c in listed if not c["supported"]}
    assert {"higher:ckpt", "torchopt:ckpt_lr", "torchopt:lr", "torchopt:lr_fo"} <= unsupported


def test_build_peer_refuses_an_unsupported_cell_with_the_reason() -> None:
    exp = small_experiment("ckpt_lr", "quick")
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        build_peer("higher", registry()["ckpt_lr"], exp)
    with pytest.raises(ConfigError, match="learnable inner LR"):
        build_peer("torchopt", registry()["lr"], exp)


def test_higher_without_tracking_is_not_fomaml() -> None:
    """Why FO goes through grad_callback: track_higher_grads=False detaches the fast weights themselves,
    so the query loss no longer reaches the initial weights at all."""
    higher = pytest.importorskip("higher", reason="higher not installed: pip install '.[peers]'")
    exp = small_experiment("fo", "cpu-bench", inner_steps=2)
    task = exp.sample()[0]
    model, loss_fn = exp.learner.model, exp.learner.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=exp.learner.cfg.inner_lr)
    with layer_checkpointing(False), \
            higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(loss_fn(fmodel(task.support_x), task.support_y))
        query = loss_fn(fmodel(task.query_x), task.query_y)
        grads = torch.autograd.grad(query, list(model.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


@pytest.mark.parametrize("peer", FO_PEERS)
def test_peer_agreement_against_our_reference_leaves_buffers(peer: str) -> None:
    _need(peer)
    exp = small_experiment("ckpt_fo", "conv4", inner_steps=2)
    tasks = exp.sample()
    before = {n: b.clone() for n, b in exp.learner.named_buffers()}
    agree = peer_agreement(build_peer(peer, registry()["fo"], exp), exp, tasks)
    assert agree["w_rel_err"] <= TOL and agree["lr_rel_err"] is None
    assert all(torch.equal(b, before[n]) for n, b in exp.learner.named_buffers())


@pytest.mark.parametrize("peer", FO_PEERS)
def test_bf16_peer_cell_matches_ours_and_fp16_is_unsupported(peer: str) -> None:
    _need(peer)
    assert supports(peer, registry()["maml"], "fp16")[0] is False
    exp = _exp("fo", "resmlp", inner_steps=2)
    exp.learner.cfg = replace(exp.learner.cfg, amp="bf16")
    exp.learner.float()
    tasks = [t.to("cpu", torch.float32) for t in exp.sample()]
    buffers = {n: b.clone() for n, b in exp.learner.named_buffers()}
    ours, _ = exp.learner.meta_gradients(tasks)
    _restore(exp, buffers)
    theirs, _ = build_peer(peer, registry()["fo"], exp).meta_gradients(tasks)
    assert agreement(ours, theirs)["w_rel_err"] <= 1e-6
    fp32, _ = exp.reference_learner(amp="off").meta_gradients(tasks)
    assert agreement(theirs, fp32)["w_rel_err"] > 1e-6  # bf16 really ran in bf16
    exp.learner.cfg = replace(exp.learner.cfg, amp="fp16")
    with pytest.raises(ConfigError, match="fp16"):
        build_peer(peer, registry()["fo"], exp)


@pytest.mark.parametrize("steps,segment,model", [(3, 1, "resmlp"), (4, 2, "conv4-gn"), (3, 2, "resmlp")])
def test_torch_maml_step_checkpoints_equal_our_step_checkpoints(steps: int, segment: int, model: str) -> None:
    """GradientCheckpointMAML(checkpoint_steps=n) against our sckpt with segments of n steps (and so against
    plain maml), float64, through the peer's .backward(); the parameters' .grad is left as found."""
    _need("torch_maml")
    exp = _exp("sckpt", model, inner_steps=steps)
    exp.variant = replace(exp.variant, step_ckpt=segment)
    exp.learner.cfg = replace(exp.learner.cfg, step_ckpt=segment)
    tasks = exp.sample()
    ours, ours_loss = exp.learner.meta_gradients(tasks)
    peer = build_peer("torch_maml", exp.variant, exp)
    assert peer.checkpointed and peer.maml.checkpoint_steps == segment
    marker = {k: torch.full_like(p, 7.0) for k, p in exp.learner.meta_parameters().items()}
    for k, p in exp.learner.meta_parameters().items():
        p.grad = marker[k].clone()
    theirs, peer_loss = peer.meta_gradients(tasks)
    assert all(torch.equal(p.grad, marker[k]) for k, p in exp.learner.meta_parameters().items())
    assert agreement(ours, theirs)["w_rel_err"] <= TOL and abs(ours_loss - peer_loss) <= TOL
    reference, _ = exp.reference_learner().meta_gradients(tasks)
    assert agreement(reference, theirs)["w_rel_err"] <= TOL


def test_torch_maml_checkpoints_are_reentrant_so_autograd_grad_is_refused() -> None:
    """Why the torch_maml adapter goes through .backward(): measured on this torch."""
    _need("torch_maml")
    exp = _exp("sckpt", "resmlp", inner_steps=2)
    peer = build_peer("torch_maml", exp.variant, exp)
    loss = peer.task_loss(exp.sample()[0])
    with pytest.raises(RuntimeError, match="use_reentrant=True.*incompatible with .grad"):
        torch.autograd.grad(loss, list(exp.learner.parameters()))


def test_torch_maml_expresses_second_order_fixed_lr_only() -> None:
    reg = registry()
    assert supports("torch_maml", reg["maml"]) == supports("torch_maml", reg["sckpt"]) == (True, "")
    assert supports("torch_maml", reg["fo"]) == (False, NO_FIRST_ORDER)
    assert supports("torch_maml", reg["sckpt_lr"]) == (False, NO_LEARN_LR_TORCH_MAML)
    assert supports("torch_maml", reg["ckpt"]) == (False, NO_LAYER_CKPT)
    assert supports("torch_maml", reg["vmaml"]) == (False, NO_VECTORIZE)
    assert cell_name("torch_maml", "sckpt") == "torch_maml:sckpt"
