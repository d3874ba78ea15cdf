"""The cifar10 dataset: an ImageFolder copy decodes to the expected tensors; a failed download is a ConfigError."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from wmbench.errors import ConfigError
from wmbench.registry import DATASETS


def write_imagefolder(root: Path) -> None:
    """Two classes; train: 3 + 2 images, test: 1 + 1; each image one flat colour, class b's red."""
    for split, counts in (("train", (3, 2)), ("test", (1, 1))):
        for name, count, colour in (("a", counts[0], (0, 0, 0)), ("b", counts[1], (255, 0, 0))):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((32, 32, 3), colour, dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_imagefolder_copy_loads_and_subsets(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_imagefolder(root)
    data = DATASETS.build("cifar10", {"root": str(root), "layout": "imagefolder"}).load(tmp_path / "cache")
    assert data.train_x.shape == (5, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32) and data.num_classes == 10
    assert sorted(data.train_y.tolist()) == [0, 0, 0, 1, 1]
    red = data.train_x[data.train_y == 1][0, :, 0, 0]
    black = data.train_x[data.train_y == 0][0, :, 0, 0]
    assert red[0] > 0 > red[1] and torch.all(black < 0)  # normalised: red channel high, others at their minimum
    subset = DATASETS.build("cifar10", {"root": str(root), "layout": "imagefolder", "subset_train": 2}).load(tmp_path / "cache")
    assert len(subset.train_x) == 2


def test_failed_download_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Offline:
        def __init__(self, *args, **kwargs) -> None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(ConfigError) as info:
        DATASETS.build("cifar10", {"root": str(tmp_path / "none")}).load(tmp_path / "cache")
    assert info.value.field == "root"  # the scenario names it datasets[i].args.root
    assert "could not download CIFAR-10" in str(info.value) and "layout=imagefolder" in str(info.value)
