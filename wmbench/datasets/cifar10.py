"""CIFAR-10: torchvision's download or an ImageFolder copy (the shared JPEG one)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from wmbench.api import bounded, location
from wmbench.data import DataBundle, Dataset
from wmbench.datasets.decoded import cached_splits, uint8_bundle
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@DATASETS.register("cifar10")
@dataclass(frozen=True)
class Cifar10(Dataset):
    """CIFAR-10 (32x32 RGB, 10 classes): torchvision's download, or an ImageFolder copy.

    ``layout: torchvision`` reads torchvision's CIFAR10 under ``root`` (``download`` allowed);
    ``layout: imagefolder`` reads root/train/<class>/*.jpg and root/test/<class>/*.jpg.

    Decoded once into uint8 tensors cached under the cache directory; normalised with the usual
    CIFAR-10 channel statistics. ``root`` defaults to <cache>/datasets/cifar10. ``root`` and
    ``download`` say where the data comes from, not what it is: they stay out of the cell ids, so
    a results store resumes with a copy anywhere (``layout`` stays in: JPEGs are not the original
    pixels)."""

    root: str | None = location(None)
    layout: Literal["torchvision", "imagefolder"] = "torchvision"
    download: bool = location(True)
    subset_train: int | None = bounded(None, ge=1)
    subset_test: int | None = bounded(None, ge=1)

    def check(self, cache_dir: Path) -> None:
        root = Path(self.root).expanduser() if self.root else cache_dir / "datasets" / "cifar10"
        if self.layout == "imagefolder":
            for split in ("train", "test"):
                if not (root / split).is_dir():
                    raise ConfigError("root", f"no such directory: {root / split} (layout: imagefolder reads root/train and root/test)")
        elif not self.download and not root.is_dir():
            raise ConfigError("root", f"no such directory: {root} (set download: true, or layout: imagefolder)")

    def load(self, cache_dir: Path) -> DataBundle:
        root = Path(self.root).expanduser() if self.root else cache_dir / "datasets" / "cifar10"
        tag = hashlib.sha256(f"{root.resolve()}|{self.layout}".encode()).hexdigest()[:16]
        splits = cached_splits(cache_dir / "datasets" / f"cifar10-{tag}.safetensors", lambda: self._decode(root))
        return uint8_bundle("cifar10", splits, self.subset_train, self.subset_test, CIFAR10_MEAN, CIFAR10_STD, 10)

    def _decode(self, root: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        if self.layout == "imagefolder":
            train, test = (_read_imagefolder(root / split, "root") for split in ("train", "test"))
        else:
            train, test = (_read_torchvision_cifar(root, is_train, self.download) for is_train in (True, False))
        return train, test


def _read_torchvision_cifar(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise ConfigError("root", f"{exc} (set download: true, or layout: imagefolder)") from None
    except OSError as exc:  # urllib's URLError and friends: offline, proxy, disk full
        raise ConfigError(
            "root",
            f"could not download CIFAR-10 into {root}: {exc} (point root at an existing copy, "
            "e.g. --set datasets[0].args.layout=imagefolder --set datasets[0].args.root=PATH)",
        ) from None
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
