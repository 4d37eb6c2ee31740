"""Claim: the Omniglot loader reads torchvision's on-disk layout from a local root (no zip, no
download), gives 28x28 images with the four rotations as extra classes, splits characters into
train/held-out, samples N-way K-shot episodes, and a missing or malformed root is one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from harness.cli.main import main
from harness.core.config import ConfigError
from harness.zoo.omniglot import Omniglot

DRAWINGS = 4


def make_fixture(root: Path, background=(("Alpha", 3), ("Beta", 2)), evaluation=(("Gamma", 3),)) -> Path:
    """torchvision's layout: omniglot-py/images_{background,evaluation}/<alphabet>/<character>/*.png (105x105)."""
    g = torch.Generator().manual_seed(0)
    for split, alphabets in (("images_background", background), ("images_evaluation", evaluation)):
        for alphabet, n_chars in alphabets:
            for c in range(n_chars):
                folder = root / "omniglot-py" / split / alphabet / f"character{c + 1:02d}"
                folder.mkdir(parents=True)
                for d in range(DRAWINGS):
                    img = torch.full((105, 105), 255, dtype=torch.uint8)
                    r, s = torch.randint(0, 60, (2,), generator=g).tolist()
                    img[r:r + 40, s:s + 20] = 0  # a black, asymmetric stroke on white, as Omniglot's PNGs
                    Image.fromarray(img.numpy(), mode="L").convert("1").save(folder / f"{c:04d}_{d + 1:02d}.png")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_fixture(tmp_path / "data")


def test_images_rotations_and_split(root: Path) -> None:
    train = Omniglot(str(root), n_way=3, k_shot=1, query=1, train_characters=5)
    test = train.heldout()
    assert len(train.characters) == 5 and len(test.characters) == 3  # 8 characters over both splits
    assert not set(train.characters) & set(test.characters)
    assert train.num_classes == 4 * 5 and test.num_classes == 4 * 3  # rotations are extra classes
    assert Omniglot(str(root), query=1, train_characters=5, rotations=False).num_classes == 5
    base = train.class_images(0)
    assert base.shape == (DRAWINGS, 1, 28, 28) and base.dtype == torch.float32
    assert 0.0 <= base.min() and base.max() <= 1.0 and base.max() == 1.0  # strokes are 1, background 0
    for r in range(1, 4):
        assert train.classes[r] == (train.classes[0][0], r)
        assert torch.equal(train.class_images(r), torch.rot90(base, r, dims=(2, 3)))
    assert not torch.equal(train.class_images(1), base)


def test_episodes(root: Path) -> None:
    sampler = Omniglot(str(root), n_way=5, k_shot=2, query=2, train_characters=5)
    tasks = sampler.sample(3, torch.Generator().manual_seed(1))
    assert len(tasks) == 3
    t = tasks[0]
    assert t.support_x.shape == (10, 1, 28, 28) and t.query_x.shape == (10, 1, 28, 28)
    assert torch.equal(t.support_y, torch.arange(5).repeat_interleave(2))
    assert torch.equal(t.query_y, torch.arange(5).repeat_interleave(2))
    again = sampler.sample(3, torch.Generator().manual_seed(1))
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(tasks, again))  # generator decides
    loss = sampler.loss_fn(torch.zeros(10, 5), t.query_y)
    assert torch.isclose(loss, torch.log(torch.tensor(5.0)))


@pytest.mark.parametrize("case", ["missing", "empty", "no_background", "no_characters"])
def test_bad_root_is_one_line(tmp_path: Path, case: str) -> None:
    bad = tmp_path / "omni"
    if case != "missing":
        bad.mkdir()
    if case == "no_background":
        (bad / "omniglot-py" / "images_evaluation").mkdir(parents=True)
    if case == "no_characters":
        (bad / "omniglot-py" / "images_background" / "Alpha").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        Omniglot(str(bad))
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg
    assert "omniglot-py/images_background/<alphabet>/<character>/*.png" in msg


def test_no_root_and_too_many_ways(root: Path) -> None:
    with pytest.raises(ConfigError, match="--data-root"):
        Omniglot(None)
    with pytest.raises(ConfigError, match="more ways"):
        Omniglot(str(root), n_way=21, train_characters=5)


def test_cli_bad_data_root_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    code = main(["ablate", "--preset", "omniglot", "--data-root", str(tmp_path / "nowhere"),
                 "--results-dir", str(tmp_path / "r"), "--plots-dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and str(tmp_path / "nowhere") in err
    assert not (tmp_path / "r").exists()
    assert main(["ablate", "--preset", "omniglot"]) == 2  # no root at all
    assert "--data-root" in capsys.readouterr().err


@pytest.mark.slow  # minutes: `make test-slow` (CI runs it)
def test_omniglot_preset_ablation_on_fixture(root: Path, tmp_path: Path) -> None:
    from harness.studies.ablation.ablate import run_ablation
    from harness.studies.ablation.spec import AblationSpec

    spec = AblationSpec(preset="omniglot", variants=("maml", "ckpt"), meta_steps=2, seeds=2, eval_tasks=2,
                        eval_every=1, meta_batch=2,
                        task_overrides=dict(data_root=str(root), train_characters=5, query=1),
                        run_id="omni")
    summary = run_ablation(spec, tmp_path / "r", tmp_path / "p", progress=False, log=lambda s: None)
    assert summary["classification"] and summary["all_identical"]
    row = summary["rows"][0]
    assert 0.0 <= row["test_acc_mean"] <= 1.0
    assert "accuracy" in (tmp_path / "r" / "omni" / "table.md").read_text()
