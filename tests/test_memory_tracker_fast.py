"""Claim: the CPU memory figure of the fast tracker (harness.bench.measure.LiveBytesTracker) is the figure of
the straightforward counter it replaced, byte for byte: the same peak, the same total and the same live bytes
at the end, on whole meta-steps and on operators that return views, write in place, share storages, return
tuples, lists or no storage, or take tensors in lists and keyword arguments.

``ReferenceTracker`` is that counter as it was (issue 24): per operator, ``tree_flatten`` of the arguments and
of the results, the storage keys of the arguments, and a ``weakref.finalize`` per new storage."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness.bench.measure import LiveBytesTracker, _tensors
from harness.loop.train import StepRunner
from tests.conftest import small_experiment


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


class ReferenceTracker(TorchDispatchMode):
    """The oracle: the tracker before the fast path, its counting unchanged (no memory cap)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocated = 0
        self._seen: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        nbytes = self._seen.pop(key, None)
        if nbytes is not None:
            self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        nbytes = st.nbytes()
        if nbytes == 0:
            return
        key = st._cdata
        if key in self._seen:
            return
        self._seen[key] = nbytes
        weakref.finalize(st, self._freed, key)
        self.live += nbytes
        self.allocated += nbytes
        if self.live > self.peak:
            self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _storage_key(t) not in inputs:
                self._track(t)
        return out


def figures(tracker: TorchDispatchMode, work) -> tuple[int, int, int]:  # noqa: ANN001
    gc.collect()
    with tracker:
        work()
    gc.collect()
    return tracker.peak, tracker.allocated, tracker.live


def operator_mix() -> None:
    """Views, in-place writes, shared storages, tuple/list results, lists and out= arguments, no storage."""
    a = torch.randn(8, 16)
    w = torch.randn(16, 16, requires_grad=True)
    v = a.view(16, 8).t()  # view: no bytes
    a.mul_(2)  # in place on a pre-existing storage: no bytes
    b = a @ w  # new storage
    b.add_(1).relu_()  # in place on a counted storage: not counted again
    parts = b.split(4)  # tuple of views of one storage
    c = torch.cat(list(parts) + [v])  # a list of tensors in
    m, i = c.max(dim=1)  # two results, two storages
    out = torch.empty(0)
    torch.mul(c.detach(), 3, out=out)  # a tensor in kwargs, resized
    s = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (3,), check_invariants=True)  # no storage
    (s.to_dense() + 1).sum()
    shared = torch.randn(64)
    x, y = shared[:32], shared[32:]  # two views, one storage
    z = torch.stack([x, y]).unbind(0)
    del parts, c
    (m.sum() + i.float().sum() + out.sum() + sum(t.sum() for t in z) + w.sum() * b.sum()).backward()


def test_operator_mix_gives_the_reference_figures() -> None:
    torch.manual_seed(0)
    ref = figures(ReferenceTracker(), operator_mix)
    torch.manual_seed(0)
    assert figures(LiveBytesTracker(), operator_mix) == ref
    assert ref[0] > 0 and ref[1] > ref[0]  # the mix allocates, frees and re-allocates


META_STEPS = [("quick", "maml"), ("quick", "lr_fo"), ("cpu-bench", "lr"), ("cpu-bench", "ckpt_lr"),
              ("cpu-bench", "sckpt_lr"), ("cpu-bench", "bckpt_lr"), ("cpu-bench", "ckpt_sckpt_lr"),
              ("cpu-bench", "vlr"), ("conv4", "maml")]


@pytest.mark.parametrize("preset,variant", META_STEPS)
def test_meta_step_gives_the_reference_figures(preset: str, variant: str) -> None:
    found = {}
    for name, tracker in (("reference", ReferenceTracker), ("fast", LiveBytesTracker)):
        exp = small_experiment(variant, preset, dtype="float32", inner_steps=3)
        step = StepRunner(exp.learner, exp.sizes["outer_lr"], exp.sample)
        step(exp.sample())  # Adam state exists before the measured step, as in measure()
        found[name] = figures(tracker(), lambda: step(exp.sample()))
    assert found["fast"] == found["reference"]


def test_tensors_are_those_tree_flatten_finds() -> None:
    t, u = torch.ones(2), torch.zeros(3)
    p = torch.nn.Parameter(torch.ones(1))
    trees = [t, (t, [u, None, 2.0]), {"out": u, "dtype": torch.float32}, torch.Size([2, 3]), [p, (u, (t,))],
             torch.return_types.max((t, u)), None]
    for tree in trees:
        expected = [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
        got = _tensors(tree, [])
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected)), tree


def test_a_new_storage_in_two_results_is_counted_once() -> None:
    fresh = torch.ones(256)  # 1 KiB, made outside the block: as if the operator had allocated it
    for tracker in (ReferenceTracker(), LiveBytesTracker()):
        tracker.__torch_dispatch__(lambda: (fresh, fresh[1:]), (), (), {})
        assert (tracker.allocated, tracker.live) == (1024, 1024), type(tracker).__name__


def test_no_dynamo_wrapper_per_operator() -> None:
    # TorchDispatchMode wraps __torch_dispatch__ in torch._disable_dynamo unless _should_skip_dynamo is False:
    # a call more per operator, and the import of torch._dynamo (seconds) at the first
    assert LiveBytesTracker.__dict__["__torch_dispatch__"].__code__.co_filename.endswith("measure.py")
