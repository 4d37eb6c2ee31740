"""Real images without a download: N-way K-shot episodes over scikit-learn's bundled 8x8 digits.

``sklearn.datasets.load_digits`` ships 1,797 handwritten digits (10 classes, about 180 each)
inside the installed package, so the real-image ablation runs in CI with no network:
``python -m harness ablate --preset digits``.  Meta-training draws its ways from
``train_classes`` of the digits, the held-out tasks (:meth:`Digits.heldout`) from the disjoint
rest; the split is a fixed permutation (``split_seed``).  Images are flattened to 64 pixels in
[0, 1], so a small MLP is the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch import Tensor

from harness.core.config import ConfigError, Task
from harness.zoo.models import MLP
from harness.zoo.tasks import cross_entropy, nway_kshot_episodes

__all__ = ["Digits", "digit_images", "digits_mlp"]

PIXELS = 64  # 8 x 8
N_CLASSES = 10


@lru_cache(maxsize=1)
def digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(float32 [n, 64] in [0, 1], int64 labels [n])``, loaded once per process."""
    from sklearn.datasets import load_digits  # optional heavy import, only for this preset

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)


@dataclass(frozen=True)
class Digits:
    """N-way K-shot digit episodes from the ``train`` or ``test`` classes; ``sample(n, gen)`` like the others."""

    n_way: int = 3
    k_shot: int = 1
    query: int = 10  # per class
    split: str = "train"
    train_classes: int = 6
    split_seed: int = 0
    loss_fn = staticmethod(cross_entropy)
    _by_class: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError(f"split must be train or test; got {self.split!r}")
        if self.n_way < 2 or self.k_shot < 1 or self.query < 1:
            raise ConfigError(f"n_way >= 2, k_shot >= 1 and query >= 1 needed; got {self.n_way}, "
                              f"{self.k_shot}, {self.query}")
        if not 0 < self.train_classes < N_CLASSES:
            raise ConfigError(f"train_classes must be in 1..{N_CLASSES - 1}; got {self.train_classes}")
        for name, size in (("train", self.train_classes), ("test", N_CLASSES - self.train_classes)):
            if self.n_way > size:
                raise ConfigError(f"n_way={self.n_way} is more ways than the {size} {name} classes "
                                  f"(train_classes={self.train_classes} of {N_CLASSES} digits)")
        x, y = digit_images()
        smallest = int(torch.bincount(y).min())
        if self.k_shot + self.query > smallest:
            raise ConfigError(f"k_shot + query = {self.k_shot + self.query} exceeds the {smallest} images of "
                              "the rarest digit")
        for c in self.classes:
            self._by_class.append(x[y == c])

    @property
    def classes(self) -> list[int]:
        """The digits of this split (a fixed permutation of 0..9 cut at ``train_classes``)."""
        order = torch.randperm(N_CLASSES, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        return order[: self.train_classes] if self.split == "train" else order[self.train_classes:]

    def heldout(self) -> "Digits":
        """The same episodes over the disjoint held-out digits."""
        return replace(self, split="test")

    def sample(self, n_tasks: int, gen: torch.Generator) -> list[Task]:
        return nway_kshot_episodes(n_tasks, len(self._by_class), self._by_class.__getitem__, self.n_way, self.k_shot,
                                   self.query, gen)


def digits_mlp(n_way: int = 3, hidden: tuple[int, ...] = (64, 64)) -> MLP:
    """The digits preset's model: 64 pixels -> ``hidden`` (ReLU) -> ``n_way`` logits."""
    return MLP(in_dim=PIXELS, hidden=hidden, out_dim=n_way)
