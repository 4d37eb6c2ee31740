"""Models written the way users write them: torch's own checkpoint in every form, and reads that bypass the
checkpointed module's own parameters.

None of these calls :func:`harness.checkpoint` except where it says so: they call
``torch.utils.checkpoint.checkpoint`` as the seed report and Hugging Face models do (a module, a bound method,
a closure, ``functools.partial``, the decorator form, ``checkpoint_sequential``, reentrant or not).  Each
was wrong or crashing before the engine routed torch's checkpoint (issue 21): a recomputation that runs after
the step's forward read the initial weights, and reentrant checkpoints cut the fast weights out of the graph.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from harness import checkpoint as harness_checkpoint

__all__ = ["USER_WRITTEN"]

IN, HID, OUT = 3, 5, 2


class SeedStyle(nn.Module):
    """The seed report's model: a ModuleList whose forward checkpoints every layer itself (its
    ``self.modules`` renamed: that name is ``nn.Module.modules``)."""

    def __init__(self, reentrant: bool = False, last_too: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(IN, HID), nn.Tanh()),
                                     nn.Sequential(nn.Linear(HID, HID), nn.Tanh()), nn.Linear(HID, OUT)])
        self.reentrant, self.last_too = reentrant, last_too

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - (0 if self.last_too else 1)
        for i, m in enumerate(self.layers):
            x = checkpoint(m, x, use_reentrant=self.reentrant) if i < last else m(x)
        return x


class RunningCentre(nn.Module):
    """A user's buffer-updating layer whose output reads the buffer it just updated."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("centre", torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            self.centre.mul_(0.5).add_(x.mean(0), alpha=0.5)
        return x - self.centre


class StatefulBlocks(nn.Module):
    """torch's checkpoint around BatchNorm (cumulative average), a buffer-reading layer and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(IN, HID), nn.BatchNorm1d(HID, momentum=None), nn.Tanh())
        self.b = nn.Sequential(nn.Linear(HID, HID), RunningCentre(HID), nn.Tanh(), nn.Dropout(0.3))
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.b, checkpoint(self.a, x, use_reentrant=False), use_reentrant=False))


class NestedTorch(nn.Module):
    """A torch-checkpointed method that checkpoints its children again: with torch's checkpoint, or with
    harness.checkpoint of a closure (which only the engine can bind, in the forward and the recomputation)."""

    def __init__(self, inner_closure: bool = False) -> None:
        super().__init__()
        self.inner = nn.ModuleList([nn.Linear(IN, HID), nn.Linear(HID, HID)])
        self.head = nn.Linear(HID, OUT)
        self.inner_closure = inner_closure

    def block(self, x: Tensor) -> Tensor:
        for layer in self.inner:
            if self.inner_closure:
                x = harness_checkpoint(lambda t, layer=layer: torch.tanh(layer(t)), x)
            else:
                x = torch.tanh(checkpoint(layer, x, use_reentrant=False))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


class BoundMethod(nn.Module):
    """A bound method that reads two submodules and a root parameter, checkpointed by torch."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(IN, HID), nn.Linear(HID, HID), nn.Linear(HID, OUT)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, HID))

    def block(self, x: Tensor) -> Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(x)) * self.gain))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


class Closure(nn.Module):
    """A function that closes over a layer's parameters (``F.linear(t, layer.weight, ...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(IN, HID), nn.Linear(HID, HID)])
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            def step(t: Tensor, layer: nn.Linear = layer) -> Tensor:
                return torch.tanh(F.linear(t, layer.weight, layer.bias))
            x = checkpoint(step, x, use_reentrant=False)
        return self.head(x)


class HFLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(HID, HID), nn.LayerNorm(HID)

    def forward(self, hidden: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> tuple[Tensor]:
        out = self.norm(hidden + torch.tanh(self.dense(hidden)) * scale)
        return (out * mask if mask is not None else out,)


class HuggingFaceStyle(nn.Module):
    """``gradient_checkpointing_enable()`` as transformers does it: ``functools.partial(checkpoint,
    use_reentrant=False)`` called on ``layer.__call__`` with positional tensors and a non-tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.layers = nn.Linear(IN, HID), nn.ModuleList([HFLayer(), HFLayer()])
        self.head = nn.Linear(HID, OUT)
        self.gradient_checkpointing = True
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.embed(x)
        mask = torch.ones_like(hidden)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, mask, 0.5)[0]
            else:
                hidden = layer(hidden, mask, 0.5)[0]
        return self.head(hidden)


class Sequential(nn.Module):
    """``checkpoint_sequential`` over an ``nn.Sequential`` (its segments but the last are checkpointed)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh(), nn.Linear(HID, OUT))

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint_sequential(self.seq, 3, x, use_reentrant=False)


DECORATOR_FORM = inspect.signature(checkpoint).parameters["function"].default is None  # torch >= 2.14


class Decorated(nn.Module):
    """The decorator form, ``@torch.utils.checkpoint.checkpoint(use_reentrant=False)`` on a method (torch >= 2.14;
    before it, the zoo has no such model)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(IN, HID), nn.Linear(HID, OUT)

    def _block(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a(x))

    block = checkpoint(use_reentrant=False)(_block) if DECORATOR_FORM else _block

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


class HookReadsRoot(nn.Module):
    """A forward pre-hook on a checkpointed block that scales its input by a parameter of the root."""

    def __init__(self, use_torch: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.2, -0.7, 0.4]))
        self.block = nn.Sequential(nn.Linear(IN, HID), nn.Tanh())
        self.head = nn.Linear(HID, OUT)
        self.block.register_forward_pre_hook(self.scale_input)  # a bound method: deep copies keep it theirs
        self.use_torch = use_torch

    def scale_input(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (args[0] * self.scale,)

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.block, x, use_reentrant=False) if self.use_torch else harness_checkpoint(self.block, x)
        return self.head(h)


class Gain(nn.Module):
    """Reads its parameter only through ``self.parameters()`` (as a norm penalty or a scale would)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.tensor(0.8))

    def forward(self, x: Tensor) -> Tensor:
        return x * sum(p for p in self.parameters())


class IteratedParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(IN, HID), Gain(), nn.Tanh())
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


class Mixer(nn.Module):
    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.own = nn.Linear(HID, HID)
        self.helpers = [shared]  # a plain list: not registered under this module

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.own(x) + self.helpers[0](x))


class PlainListModule(nn.Module):
    """A block that calls a module it holds in a plain Python list (registered elsewhere in the model)."""

    def __init__(self, use_torch: bool) -> None:
        super().__init__()
        self.inp, self.shared = nn.Linear(IN, HID), nn.Linear(HID, HID)
        self.mixer = Mixer(self.shared)
        self.head = nn.Linear(HID, OUT)
        self.use_torch = use_torch

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = checkpoint(self.mixer, h, use_reentrant=False) if self.use_torch else harness_checkpoint(self.mixer, h)
        return self.head(h)


class NoisyLayer(nn.Module):
    """Gaussian noise from the layer's own ``torch.Generator`` (not the global one)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.gen = torch.Generator().manual_seed(5)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return torch.tanh(self.lin(x) * (1.0 + 0.3 * noise))


class OwnGenerator(nn.Module):
    def __init__(self, use_torch: bool = False) -> None:
        super().__init__()
        self.inp, self.noisy, self.head = nn.Linear(IN, HID), NoisyLayer(HID), nn.Linear(HID, OUT)
        self.use_torch = use_torch

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = checkpoint(self.noisy, h, use_reentrant=False) if self.use_torch else harness_checkpoint(self.noisy, h)
        return self.head(h)


class EmbeddingMaxNorm(nn.Module):
    """``nn.Embedding(max_norm=...)`` renormalises its weight in place in the forward; inside harness.checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, HID, max_norm=1.0)
        self.inp, self.head = nn.Linear(IN, HID), nn.Linear(HID, OUT)
        self.register_buffer("ids", torch.tensor([0, 2, 4, 1, 3, 5]))

    def block(self, x: Tensor) -> Tensor:
        return torch.tanh(self.inp(x) + self.emb(self.ids[: x.shape[0]]))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(harness_checkpoint(self.block, x))


class ComplexWeights(nn.Module):
    """A complex linear layer (complex parameters) between real ones; the output is real."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, HID)
        self.w = nn.Parameter(torch.randn(HID, HID, dtype=torch.cdouble) * 0.4)
        self.head = nn.Linear(HID, OUT)

    def mix(self, h: Tensor) -> Tensor:
        z = h.to(self.w.dtype) @ self.w.t()
        return torch.tanh(z.real + 0.5 * z.imag)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(harness_checkpoint(self.mix, torch.tanh(self.inp(x))))


USER_WRITTEN = {
    "torch_ckpt_seed_style": (SeedStyle, {}),
    "torch_ckpt_reentrant": (SeedStyle, {"reentrant": True}),
    "torch_ckpt_reentrant_every_layer": (SeedStyle, {"reentrant": True, "last_too": True}),
    "torch_ckpt_bound_method": (BoundMethod, {}),
    "torch_ckpt_closure": (Closure, {}),
    "torch_ckpt_hugging_face_partial": (HuggingFaceStyle, {}),
    "torch_ckpt_sequential": (Sequential, {}),
    **({"torch_ckpt_decorator": (Decorated, {})} if DECORATOR_FORM else {}),
    "torch_ckpt_stateful": (StatefulBlocks, {}),
    "torch_ckpt_nested": (NestedTorch, {}),
    "torch_ckpt_nested_harness_closure": (NestedTorch, {"inner_closure": True}),
    "hook_reads_root_torch": (HookReadsRoot, {"use_torch": True}),
    "hook_reads_root_harness": (HookReadsRoot, {"use_torch": False}),
    "plain_list_module_torch": (PlainListModule, {"use_torch": True}),
    "parameters_iterated_in_forward": (IteratedParameters, {}),
    "plain_list_module_harness": (PlainListModule, {"use_torch": False}),
    "own_generator": (OwnGenerator, {}),
    "own_generator_torch": (OwnGenerator, {"use_torch": True}),
    "embedding_max_norm": (EmbeddingMaxNorm, {}),
    "complex_weights": (ComplexWeights, {}),
}
