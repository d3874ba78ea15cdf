"""CIFAR-10: torchvision's download or an ImageFolder copy (the shared JPEG one)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from wmbench.api import bounded, location
from wmbench.data import DataBundle, Dataset
from wmbench.datasets.decoded import cached_splits, read_image, rgb8, source_fingerprint, uint8_bundle
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = 10
TORCHVISION_FOLDER = "cifar-10-batches-py"  # where torchvision's CIFAR10 keeps its python batches


@DATASETS.register("cifar10")
@dataclass(frozen=True)
class Cifar10(Dataset):
    """CIFAR-10 (32x32 RGB, 10 classes): torchvision's download, or an ImageFolder copy.

    ``layout: torchvision`` reads torchvision's CIFAR10 under ``root`` (``download`` allowed);
    ``layout: imagefolder`` reads root/train/<class>/*.jpg and root/test/<class>/*.jpg: the same 10
    class folders under both (labels follow their sorted names), each holding readable images.

    Decoded once into uint8 tensors cached under the cache directory, keyed by the root, the layout
    and a fingerprint of the source files (names, sizes, modification times: editing one decodes
    again); normalised with the usual CIFAR-10 channel statistics. ``root`` defaults to <cache>/datasets/cifar10. ``root`` and
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
            _imagefolder_classes(root)
        else:
            _not_an_imagefolder(root)
        if self.layout == "torchvision" and not self.download and not root.is_dir():
            raise ConfigError("root", f"no such directory: {root} (set download: true, or layout: imagefolder)")

    def needs_download(self, cache_dir: Path) -> bool:
        root = Path(self.root).expanduser() if self.root else cache_dir / "datasets" / "cifar10"
        return self.layout == "torchvision" and self.download and not (root / TORCHVISION_FOLDER).is_dir()

    def load(self, cache_dir: Path) -> DataBundle:
        root = Path(self.root).expanduser() if self.root else cache_dir / "datasets" / "cifar10"
        folders = ("train", "test") if self.layout == "imagefolder" else (TORCHVISION_FOLDER,)
        source = f"{root.resolve()}|{self.layout}"
        tag = hashlib.sha256(f"{source}|{source_fingerprint(root, folders)}".encode()).hexdigest()[:16]
        splits = cached_splits(cache_dir / "datasets" / f"cifar10-{tag}.safetensors", lambda: self._decode(root), source)
        return uint8_bundle("cifar10", splits, self.subset_train, self.subset_test, CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CLASSES)

    def _decode(self, root: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        if self.layout == "imagefolder":
            classes = _imagefolder_classes(root)
            train, test = (_read_imagefolder(root / split, classes) for split in ("train", "test"))
        else:
            _not_an_imagefolder(root)
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


def _not_an_imagefolder(root: Path) -> None:
    """``layout: torchvision`` pointed at an ImageFolder copy would download CIFAR-10 into it: refused."""
    if (root / "train").is_dir() and (root / "test").is_dir() and not (root / TORCHVISION_FOLDER).is_dir():
        raise ConfigError("root", f"{root} holds train/ and test/ folders, not torchvision's {TORCHVISION_FOLDER}: "
                          "set layout: imagefolder (layout: torchvision, the default, would download CIFAR-10 into it)")


def _class_folders(split: Path) -> list[str]:
    """The class folder names under ``split``, sorted as torchvision's ImageFolder labels them."""
    if not split.is_dir():
        raise ConfigError("root", f"no such directory: {split}")
    with os.scandir(split) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes:
        raise ConfigError("root", f"{split}: no class folder (layout: imagefolder reads {split}/<class>/*.jpg)")
    return classes


def _imagefolder_classes(root: Path) -> list[str]:
    """The class folders, the same CIFAR10_CLASSES under root/train and root/test: ImageFolder
    numbers each split's folders on its own, so one missing folder would shift every later label."""
    train, test = (_class_folders(root / split) for split in ("train", "test"))
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ConfigError(
            "root",
            f"{root}: train/ and test/ must hold the same class folders; only in train/: "
            f"{', '.join(map(ascii, only_train)) or '-'}; only in test/: {', '.join(map(ascii, only_test)) or '-'}",
        )
    if len(train) != CIFAR10_CLASSES:
        raise ConfigError(
            "root", f"{root}: {len(train)} class folders ({', '.join(train)}) under train/ and test/; cifar10 has {CIFAR10_CLASSES}"
        )
    return train


def _read_imagefolder(path: Path, classes: list[str]) -> tuple[Tensor, Tensor]:
    """One split as uint8 tensors, images (N, 3, 32, 32) and labels, in ImageFolder's order."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from tqdm import tqdm

    folder = ImageFolder(str(path), allow_empty=True)
    if folder.classes != classes:  # changed since it was checked
        raise ConfigError("root", f"{path}: class folders changed while reading ({', '.join(folder.classes)})")
    empty = sorted(set(classes) - {classes[label] for _, label in folder.samples})
    if empty:
        folders = ", ".join(str(path / name) for name in empty)
        raise ConfigError("root", f"no image ({', '.join(IMG_EXTENSIONS)}) in {folders}")
    images = np.empty((len(folder.samples), 32, 32, 3), dtype=np.uint8)
    for i, (file, _) in enumerate(tqdm(folder.samples, desc=f"decode {path.name}", unit="img", leave=False)):
        images[i] = read_image(file, lambda img: np.asarray(rgb8(img, file).resize((32, 32))))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
