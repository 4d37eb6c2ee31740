"""Models a careful user writes, each built to trip a functional MAML engine in one specific way.

Each calls :func:`harness.checkpoint` where a user would call ``torch.utils.checkpoint`` (so layer-checkpointed
variants checkpoint them). ``ZOO``: name -> (builder, tasks, adapt_last); tiny, float64, seconds for the zoo.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from harness import checkpoint
from harness.core.config import Task
from tests.zoo.user_written import USER_WRITTEN

__all__ = ["ZOO", "ZooEntry", "image_tasks", "mse", "regression_tasks", "sequence_tasks"]

IN, HID, OUT = 3, 5, 2


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).mean()

class TiedAutoencoder(nn.Module):
    """``b.weight`` is ``a.weight`` (one tensor, two owners); the decoder reuses the encoder's weight, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(IN, HID)
        self.a = nn.Linear(HID, HID)
        self.b = nn.Linear(HID, HID)
        self.b.weight = self.a.weight
        self.dec_bias = nn.Parameter(torch.zeros(IN))
        self.head = nn.Linear(IN, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(checkpoint(self.enc, x))
        h = torch.tanh(checkpoint(self.b, torch.tanh(self.a(h))))
        return self.head(F.linear(h, self.enc.weight.t(), self.dec_bias))


class SharedModule(nn.Module):
    """One Linear registered twice (two owners, one tensor) and applied twice: truly tied modules."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HID)
        self.mid = nn.Linear(HID, HID)
        self.again = self.mid
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(checkpoint(self.mid, h))
        h = torch.tanh(checkpoint(self.again, h))
        return self.head(h)


class FrozenLayer(nn.Module):
    """A frozen (requires_grad=False) first layer: never adapted, never meta-learned, still used."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(IN, HID).requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(HID, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.body, torch.tanh(self.frozen(x))))


class UnusedParameter(nn.Module):
    """A parameter the forward never reads (a spare head, kept for later): zero inner gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, HID), nn.Tanh())
        self.spare = nn.Linear(HID, OUT)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.body, x))


class DropoutMLP(nn.Module):
    """Dropout in train mode, inside and outside checkpointed blocks: the masks come from the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Dropout(0.3))
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(checkpoint(self.block, x)))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HID)
        self.block = nn.Sequential(nn.LayerNorm(HID), nn.Linear(HID, HID), nn.GELU())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)
        return self.head(h + checkpoint(self.block, h))


class Attention(nn.Module):
    """Self-attention; keyword arguments in, a tuple out (need_weights=True: fused attention has no double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        out, _ = checkpoint(self.attn, h, h, value=h, need_weights=True, average_attn_weights=False)
        return self.head(h + out).mean(1)


class LSTMTagger(nn.Module):
    """An LSTM cell stepped over a sequence; its (h, c) tuple state goes through harness.checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(IN, HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], HID)
        state = (h, h)
        for t in range(x.shape[1]):
            state = checkpoint(self.cell, x[:, t], state)
        return self.head(state[0])


class GRUTagger(nn.Module):  # the state passed as a keyword argument (hx=h)
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(IN, HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], HID)
        for t in range(x.shape[1]):
            h = checkpoint(self.cell, x[:, t], hx=h)
        return self.head(h)


class BatchNormNoMomentum(nn.Module):
    """BatchNorm with momentum=None (cumulative average): running stats depend on every forward."""

    def __init__(self, momentum: float | None = None) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(IN, HID), nn.BatchNorm1d(HID, momentum=momentum), nn.Tanh())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x))


class RunningCentre(nn.Module):
    """A user's own buffer-updating layer whose output reads the buffer it just updated."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(width))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.calls += 1
            self.centre.mul_(0.5).add_(x.mean(0), alpha=0.5)
        return x - self.centre * (1.0 + 0.1 * self.calls)


class UserBufferLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(IN, HID), RunningCentre(HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x))


class SpectralNormHook(nn.Module):
    """Classic hook-based spectral norm: power iteration updates weight_u/weight_v, the output reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.sn = torch.nn.utils.spectral_norm(nn.Linear(IN, HID))
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(checkpoint(self.sn, x)))


class SpectralNormParametrized(nn.Module):
    """torch.nn.utils.parametrizations.spectral_norm: parameters named parametrizations.weight.original."""

    def __init__(self) -> None:
        super().__init__()
        self.sn = parametrizations.spectral_norm(nn.Linear(IN, HID))
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(checkpoint(self.sn, x)))


class Symmetric(nn.Module):  # a parametrization: the weight is the symmetric part of `original`
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).transpose(-1, -2)

class ParametrizedSymmetric(nn.Module):
    """A user's own torch.nn.utils.parametrize parametrization (a symmetric weight) and weight norm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = parametrizations.weight_norm(nn.Linear(IN, HID))
        self.sym = nn.Linear(HID, HID)
        parametrize.register_parametrization(self.sym, "weight", Symmetric())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(checkpoint(self.sym, torch.tanh(checkpoint(self.inp, x)))))


class DunderNames(nn.Module):
    """`a.b` next to `a__b` (and `a_` + `_b`): the LR keys must keep them apart, with different shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Module()
        self.a.b = nn.Linear(IN, HID)
        self.add_module("a__b", nn.Linear(HID, 4))
        self.a_ = nn.Module()
        self.a_.add_module("_b", nn.Linear(4, OUT))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(checkpoint(self.a.b, x))
        return getattr(self.a_, "_b")(torch.tanh(getattr(self, "a__b")(h)))


class RootParameter(nn.Module):
    """Parameters owned by the root module (its LR group is the root) next to a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.7, -1.3]))
        self.proj = nn.Linear(IN, OUT)
        self.offset = nn.Parameter(torch.randn(OUT) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self.proj, x) * self.scale + self.offset


class ViewsAndBuffers(nn.Module):
    """Non-contiguous parameter views (transposes, slices) and a read-only buffer the output reads."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(HID + 2, IN).t().contiguous().t())
        self.mix = nn.Linear(HID, HID)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, HID))
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w[:HID].t()) * self.gain
        h = checkpoint(self.mix, h) + h.t().flip(0).t()
        return self.head(torch.tanh(h))


class NestedCheckpoints(nn.Module):
    """A checkpointed block that checkpoints its own children."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.ModuleList([nn.Linear(IN, HID), nn.Linear(HID, HID)])
        self.head = nn.Linear(HID, OUT)

    def block(self, x: Tensor) -> Tensor:
        for layer in self.inner:
            x = torch.tanh(checkpoint(layer, x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x))


class ConvBatchNorm(nn.Module):
    """Conv + BatchNorm2d (default momentum) + pooling, the MAML image network in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(3 * 2 * 2, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x).flatten(1))


def regression_tasks(gen: torch.Generator, n: int = 2, shape: tuple[int, ...] = (IN,)) -> list[Task]:
    def draw() -> list[Tensor]:
        return [torch.randn(6, *s, generator=gen, dtype=torch.float64) for s in (shape, (OUT,))]
    return [Task(*draw(), *draw()) for _ in range(n)]


def sequence_tasks(gen: torch.Generator, n: int = 2) -> list[Task]:
    return regression_tasks(gen, n, (3, IN))


def image_tasks(gen: torch.Generator, n: int = 2) -> list[Task]:
    return regression_tasks(gen, n, (1, 4, 4))


class ZooEntry(NamedTuple):
    build: Callable[[], nn.Module]
    tasks: Callable[[torch.Generator], list[Task]]
    adapt_last: int | None = None


ZOO: dict[str, ZooEntry] = {
    "tied": ZooEntry(TiedAutoencoder, regression_tasks),
    "shared_module": ZooEntry(SharedModule, regression_tasks),
    "frozen": ZooEntry(FrozenLayer, regression_tasks),
    "unused": ZooEntry(UnusedParameter, regression_tasks),
    "dropout": ZooEntry(DropoutMLP, regression_tasks),
    "layernorm": ZooEntry(LayerNormMLP, regression_tasks),
    "attention": ZooEntry(Attention, sequence_tasks),
    "lstm_tuple_state": ZooEntry(LSTMTagger, sequence_tasks),
    "gru_kwarg_state": ZooEntry(GRUTagger, sequence_tasks),
    "batchnorm_momentum_none": ZooEntry(BatchNormNoMomentum, regression_tasks),
    "user_buffer_layer": ZooEntry(UserBufferLayer, regression_tasks),
    "spectral_norm_hook": ZooEntry(SpectralNormHook, regression_tasks),
    "spectral_norm_parametrize": ZooEntry(SpectralNormParametrized, regression_tasks),
    "parametrize_symmetric_weight_norm": ZooEntry(ParametrizedSymmetric, regression_tasks),
    "dunder_names": ZooEntry(DunderNames, regression_tasks),
    "root_parameter": ZooEntry(RootParameter, regression_tasks),
    "views_and_buffers": ZooEntry(ViewsAndBuffers, regression_tasks),
    "nested_checkpoints": ZooEntry(NestedCheckpoints, regression_tasks),
    "conv_batchnorm": ZooEntry(ConvBatchNorm, image_tasks),
    "adapt_last_2": ZooEntry(LayerNormMLP, regression_tasks, adapt_last=2),
}

# torch's own checkpoint in every form, hooks and plain-list modules, a layer's own generator, max_norm
# embeddings, complex weights (tests/zoo/user_written.py)
ZOO.update({name: ZooEntry(functools.partial(cls, **kw), regression_tasks) for name, (cls, kw) in USER_WRITTEN.items()})
