"""Omniglot through ``torchvision.datasets.Omniglot``, read from a local root.

The usual protocol (Finn et al. 2017, after Santoro et al. 2016): the 1623
characters of both torchvision splits (``images_background`` and
``images_evaluation``) pooled and shuffled with a fixed seed, the first 1200
for meta-training and the rest held out; every image resized to 28x28; each
character's four rotations (0, 90, 180, 270 degrees) are four distinct
classes.  Episodes are N-way K-shot with ``query`` query images per class.

Expected layout (what ``torchvision.datasets.Omniglot`` extracts)::

    <root>/omniglot-py/images_background/<alphabet>/<character>/*.png
    <root>/omniglot-py/images_evaluation/<alphabet>/<character>/*.png   (optional)

Nothing is downloaded unless ``download=True`` (``--download``).  torchvision
itself insists on the zip files next to the extracted folders; here an
extracted folder in the layout above is enough.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.core.config import ConfigError, Task
from harness.zoo.tasks import cross_entropy, nway_kshot_episodes

__all__ = ["LAYOUT", "SPLITS", "Omniglot", "load_characters"]

SPLITS = ("images_background", "images_evaluation")
LAYOUT = "<root>/omniglot-py/images_background/<alphabet>/<character>/*.png (images_evaluation/ likewise, optional)"


def _omniglot_class():
    from torchvision.datasets import Omniglot

    class LocalOmniglot(Omniglot):
        """torchvision's Omniglot that accepts an extracted folder without the zip next to it."""

        def _check_integrity(self) -> bool:  # noqa: D401
            return Path(self.root, self._get_target_folder()).is_dir() or super()._check_integrity()

    return LocalOmniglot


def _bad_root(root: Path, why: str) -> ConfigError:
    return ConfigError(f"Omniglot data root {root} {why}; expected layout {LAYOUT} "
                       "(pass --download to fetch it with torchvision)")


def load_characters(root: str | Path, download: bool = False) -> tuple[list[Any], list[tuple[int, int]]]:
    """torchvision datasets for the splits present, and (dataset index, character index) per character."""
    root = Path(root).expanduser()
    if download:
        try:
            cls = _omniglot_class()
            for background in (True, False):
                cls(str(root), background=background, download=True)
        except Exception as exc:  # network or disk trouble: one line
            raise ConfigError(f"could not download Omniglot into {root}: {exc}") from exc
    if not root.is_dir():
        raise _bad_root(root, "does not exist")
    base = root / "omniglot-py"
    if not (base / SPLITS[0]).is_dir():
        raise _bad_root(root, f"has no {base / SPLITS[0]}")
    cls = _omniglot_class()
    datasets, chars = [], []
    for split in SPLITS:
        if not (base / split).is_dir():
            continue
        try:
            ds = cls(str(root), background=(split == SPLITS[0]), download=False)
        except Exception as exc:
            raise _bad_root(root, f"could not be read ({exc})") from exc
        for c, images in enumerate(ds._character_images):
            if images:
                chars.append((len(datasets), c))
        datasets.append(ds)
    if not chars:
        raise _bad_root(root, f"has no <alphabet>/<character>/*.png under {base / SPLITS[0]}")
    return datasets, chars


@dataclass(eq=False)
class Omniglot:
    """N-way K-shot Omniglot episodes; ``sample(n_tasks, gen)`` like the samplers in :mod:`harness.zoo.tasks`.

    Classes are (character, rotation) pairs of the chosen ``split`` (``train``:
    the first ``train_characters`` of the shuffled characters, ``test``: the rest).
    """

    data_root: str | None = None
    n_way: int = 5
    k_shot: int = 1
    query: int = 15  # per class (MAML used 15 for 5-way, 5 for 20-way)
    split: str = "train"
    train_characters: int = 1200
    rotations: bool = True
    size: int = 28
    split_seed: int = 0
    download: bool = False
    loss_fn = staticmethod(cross_entropy)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.data_root is None:
            raise ConfigError("Omniglot needs a data root: pass --data-root DIR (expected layout "
                              f"{LAYOUT}), and --download to fetch it")
        if self.split not in ("train", "test"):
            raise ConfigError(f"split must be train or test; got {self.split!r}")
        if self.n_way < 1 or self.k_shot < 1 or self.query < 1:
            raise ConfigError(f"n_way, k_shot and query must be >= 1; got {self.n_way}, {self.k_shot}, {self.query}")
        self._datasets, chars = load_characters(self.data_root, self.download)
        if not 0 < self.train_characters < len(chars):
            raise ConfigError(f"train_characters={self.train_characters} must leave held-out characters; "
                              f"{self.data_root} has {len(chars)} characters")
        order = torch.randperm(len(chars), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        picked = order[: self.train_characters] if self.split == "train" else order[self.train_characters:]
        self.characters = [chars[i] for i in picked]
        n_rot = 4 if self.rotations else 1
        self.classes = [(ch, r) for ch in self.characters for r in range(n_rot)]
        if self.n_way > len(self.classes):
            raise ConfigError(f"n_way={self.n_way} is more ways than the {len(self.classes)} classes "
                              f"of the {self.split} split")
        smallest = min(len(self._datasets[d]._character_images[c]) for d, c in self.characters)
        if self.k_shot + self.query > smallest:
            raise ConfigError(f"k_shot + query = {self.k_shot + self.query} exceeds the {smallest} drawings "
                              "of some character")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def heldout(self) -> "Omniglot":
        """The same episodes over the held-out characters."""
        return replace(self, split="test")

    def character_images(self, char: tuple[int, int]) -> Tensor:
        """All drawings of one character, ``(n, 1, size, size)`` in [0, 1], strokes 1 (cached)."""
        if char not in self._cache:
            from PIL import Image

            d, c = char
            ds = self._datasets[d]
            folder = Path(ds.target_folder, ds._characters[c])
            imgs = []
            for name, _ in ds._character_images[c]:
                with Image.open(folder / name) as im:
                    im = im.convert("L").resize((self.size, self.size), Image.BILINEAR)
                    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(self.size, self.size)
                imgs.append(1.0 - t.float() / 255.0)
            self._cache[char] = torch.stack(imgs).unsqueeze(1)
        return self._cache[char]

    def class_images(self, cls: int) -> Tensor:
        char, rot = self.classes[cls]
        return torch.rot90(self.character_images(char), rot, dims=(2, 3))

    def sample(self, n_tasks: int, gen: torch.Generator) -> list[Task]:
        return nway_kshot_episodes(n_tasks, len(self.classes), self.class_images, self.n_way, self.k_shot,
                                   self.query, gen)
