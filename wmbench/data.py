"""Datasets, decoded once and held as tensors: digits (embedded), cifar10, synthetic (tests)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from wmbench.errors import ConfigError
from wmbench.registry import DATASETS

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Train and test tensors of one dataset; images are float (N, C, H, W), labels int64."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    task: str = "classification"

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.train_x.shape[2]), int(self.train_x.shape[3]))


class Dataset:
    """A dataset component: a frozen dataclass whose ``load`` returns a DataBundle."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"

    def load(self, cache_dir: Path) -> DataBundle:
        raise NotImplementedError


def take_subset(x: Tensor, y: Tensor, size: int | None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed random subset of ``size`` examples (all of them when size is None)."""
    if size is None or size >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


def standardize(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel standardisation with the training set's statistics."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


@DATASETS.register("digits")
@dataclass(frozen=True)
class Digits(Dataset):
    """scikit-learn's handwritten digits: 1797 8x8 grayscale images, 10 classes, no download.

    A fixed stratified 80/20 split, standardised with the training set's statistics."""

    test_fraction: float = 0.2
    subset_train: int | None = None
    subset_test: int | None = None

    def load(self, cache_dir: Path) -> DataBundle:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        idx_train, idx_test = train_test_split(
            np.arange(len(y)), test_size=self.test_fraction, random_state=0, stratify=digits.target
        )
        train_x, test_x = standardize(x[idx_train], x[idx_test])
        train_x, train_y = take_subset(train_x, y[idx_train], self.subset_train)
        test_x, test_y = take_subset(test_x, y[idx_test], self.subset_test)
        return DataBundle("digits", train_x, train_y, test_x, test_y, 10)


@DATASETS.register("synthetic")
@dataclass(frozen=True)
class Synthetic(Dataset):
    """Random images labelled by a fixed random linear teacher: for tests only."""

    n_train: int = 256
    n_test: int = 128
    channels: int = 3
    size: int = 8
    num_classes: int = 4
    seed: int = 0

    def load(self, cache_dir: Path) -> DataBundle:
        g = torch.Generator().manual_seed(self.seed)
        n = self.n_train + self.n_test
        x = torch.randn(n, self.channels, self.size, self.size, generator=g)
        teacher = torch.randn(self.channels * self.size * self.size, self.num_classes, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
        return DataBundle(
            "synthetic", x[: self.n_train], y[: self.n_train], x[self.n_train :], y[self.n_train :], self.num_classes
        )


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@DATASETS.register("cifar10")
@dataclass(frozen=True)
class Cifar10(Dataset):
    """CIFAR-10 (32x32 RGB, 10 classes): torchvision's download, or an ImageFolder copy.

    ``layout: torchvision`` reads torchvision's CIFAR10 under ``root`` (``download`` allowed);
    ``layout: imagefolder`` reads root/train/<class>/*.jpg and root/test/<class>/*.jpg.

    Decoded once into uint8 tensors cached under the cache directory; normalised with the usual
    CIFAR-10 channel statistics. ``root`` defaults to <cache>/datasets/cifar10."""

    root: str | None = None
    layout: Literal["torchvision", "imagefolder"] = "torchvision"
    download: bool = True
    subset_train: int | None = None
    subset_test: int | None = None

    def load(self, cache_dir: Path) -> DataBundle:
        root = Path(self.root).expanduser() if self.root else cache_dir / "datasets" / "cifar10"
        train_x, train_y, test_x, test_y = self._decoded(root, cache_dir)
        train_x, train_y = take_subset(train_x, train_y, self.subset_train)
        test_x, test_y = take_subset(test_x, test_y, self.subset_test)
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        norm = lambda x: (x.float() / 255.0 - mean) / std  # noqa: E731
        return DataBundle("cifar10", norm(train_x), train_y, norm(test_x), test_y, 10)

    def _decoded(self, root: Path, cache_dir: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from safetensors.torch import load_file, save_file

        tag = hashlib.sha256(f"{root.resolve()}|{self.layout}".encode()).hexdigest()[:16]
        cached = cache_dir / "datasets" / f"cifar10-{tag}.safetensors"
        if cached.is_file():
            t = load_file(str(cached))
            return t["train_x"], t["train_y"], t["test_x"], t["test_y"]
        if self.layout == "imagefolder":
            parts = [_read_imagefolder(root / split, f"datasets.cifar10.root ({root / split})") for split in ("train", "test")]
        else:
            parts = [_read_torchvision_cifar(root, train, self.download) for train in (True, False)]
        (train_x, train_y), (test_x, test_y) = parts
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".tmp")
        save_file({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}, str(tmp))
        tmp.replace(cached)
        return train_x, train_y, test_x, test_y


def _read_torchvision_cifar(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise ConfigError("datasets.cifar10.root", f"{exc} (set download: true, or layout: imagefolder)") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def _read_imagefolder(path: Path, where: str) -> tuple[Tensor, Tensor]:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from tqdm import tqdm

    if not path.is_dir():
        raise ConfigError(where, f"no such directory: {path}")
    folder = ImageFolder(str(path))
    images = np.empty((len(folder.samples), 32, 32, 3), dtype=np.uint8)
    for i, (file, _) in enumerate(tqdm(folder.samples, desc=f"decode {path.name}", unit="img", leave=False)):
        with Image.open(file) as img:
            images[i] = np.asarray(img.convert("RGB").resize((32, 32)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
