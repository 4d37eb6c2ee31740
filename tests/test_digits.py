"""Claim: the `digits` preset gives N-way K-shot episodes of real images with no network (scikit-learn's
bundled 8x8 digits), meta-trains on some digits and meta-tests on the disjoint rest, rejects impossible
sizes with a one-line error, and its smallest ablation runs end to end (the CI run of the real-image preset)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from harness.cli.main import main
from harness.core.config import ConfigError
from harness.zoo.digits import Digits, digit_images
from harness.zoo.presets import get_preset


def test_the_bundled_digits_are_the_real_dataset() -> None:
    x, y = digit_images()
    assert x.shape == (1797, 64) and 0.0 <= float(x.min()) and float(x.max()) == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_meta_train_and_meta_test_digits_are_disjoint() -> None:
    train = Digits()
    test = train.heldout()
    assert len(train.classes) == 6 and len(test.classes) == 4
    assert set(train.classes).isdisjoint(test.classes) and set(train.classes) | set(test.classes) == set(range(10))
    x, y = digit_images()
    (task,) = test.sample(1, torch.Generator().manual_seed(0))
    images = {tuple(row.tolist()): int(label) for row, label in zip(x, y)}
    drawn = {images[tuple(row.tolist())] for row in torch.cat([task.support_x, task.query_x])}
    assert drawn <= set(test.classes) and len(drawn) == 3


def test_episodes_are_n_way_k_shot_and_reproducible() -> None:
    d = Digits(n_way=4, k_shot=2, query=5)
    a = d.sample(2, torch.Generator().manual_seed(7))
    b = d.sample(2, torch.Generator().manual_seed(7))
    t = a[0]
    assert t.support_x.shape == (8, 64) and t.query_x.shape == (20, 64)
    assert t.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and t.query_y.bincount().tolist() == [5, 5, 5, 5]
    assert all(torch.equal(p.support_x, q.support_x) and torch.equal(p.query_x, q.query_x) for p, q in zip(a, b))
    model = get_preset("digits").model(n_way=4)
    assert model(t.query_x).shape == (20, 4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_way=5), "more ways than the 4 test classes"),
    (dict(k_shot=200), "rarest digit"),
    (dict(train_classes=10), "train_classes"),
    (dict(split="val"), "split"),
])
def test_impossible_sizes_are_one_line_errors(kwargs, words) -> None:
    with pytest.raises(ConfigError, match=words):
        Digits(**kwargs)


@pytest.mark.slow  # minutes: `make test-slow` (CI runs it)
def test_smallest_digits_ablation_runs_end_to_end(tmp_path: Path) -> None:
    code = main(["ablate", "--preset", "digits", "--variants", "maml,fo,ckpt", "--meta-steps", "3", "--seeds", "2",
                 "--eval-tasks", "4", "--eval-every", "2", "--no-progress",
                 "--results-dir", str(tmp_path / "r"), "--plots-dir", str(tmp_path / "p")])
    assert code == 0
    d = tmp_path / "r" / "ablation-digits"
    rows = {r["variant"]: r for r in csv.DictReader((d / "ablation.csv").open())}
    assert 0.0 <= float(rows["maml"]["test_acc_mean"]) <= 1.0 and rows["maml"]["seeds"] == "2"
    metrics = {e["metric"] for e in csv.DictReader((d / "effects.csv").open())}
    assert metrics == {"meta-test loss", "meta-test accuracy"}
    assert "bit-identical" in (d / "table.md").read_text()
    assert (tmp_path / "p" / "ablation-digits" / "learning_curves.png").exists()
