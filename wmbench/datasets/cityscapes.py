"""Cityscapes semantic segmentation (fine annotations, 19 train ids), from a local copy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wmbench.api import bounded, location
from wmbench.data import IGNORE_INDEX, DataBundle, Dataset
from wmbench.datasets.decoded import cached_splits, read_image, rgb8, source_fingerprint, uint8_bundle
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cityscapes_train_ids() -> Tensor:
    """Cityscapes label id (0..255) -> train id (0..18, else 255), a uint8 lookup table built from
    torchvision's ``Cityscapes.classes`` (cityscapesscripts' labels list): the 19 evaluated classes
    keep their train id, every other id (void, unlabeled, rarely seen classes) maps to 255."""
    from torchvision.datasets import Cityscapes

    table = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < IGNORE_INDEX:
            table[c.id] = c.train_id
    return table


@DATASETS.register("cityscapes")
@dataclass(frozen=True)
class Cityscapes(Dataset):
    """Cityscapes semantic segmentation, fine annotations, 19 train ids (255 ignored); root required.

    Read with torchvision's ``Cityscapes`` from ``root`` (required: the directory holding
    leftImg8bit/ and gtFine/, which cannot be downloaded automatically). The ``train`` split is the
    training set, ``val`` the test set (the official test labels are not public).

    Images are resized to ``size`` = [H, W] (bilinear), label maps too (nearest); the label ids are
    mapped to train ids (``cityscapes_train_ids``). Decoded once into uint8 tensors cached under
    the cache directory, keyed by the root, the size and a fingerprint of the source files (names,
    sizes, modification times: editing one decodes again); normalised with the ImageNet channel
    statistics. ``subset_train`` and ``subset_test`` keep a fixed random subset. An unreadable
    image or label map is a ConfigError naming the file."""

    root: str | None = location(None)
    size: list[int] = bounded([256, 512], ge=1, le=4096)
    subset_train: int | None = bounded(None, ge=1)
    subset_test: int | None = bounded(None, ge=1)

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("root is required: the directory holding Cityscapes' leftImg8bit/ and gtFine/ (no download)")
        if len(self.size) != 2 or any(v < 1 for v in self.size):
            raise ValueError(f"size is [height, width], two integers >= 1; got {list(self.size)}")

    def check(self, cache_dir: Path) -> None:
        where = "root"
        if not self.root:
            raise ConfigError(where, "required: the directory holding Cityscapes' leftImg8bit/ and gtFine/ (no download)")
        root = Path(self.root).expanduser()
        for sub in ("leftImg8bit", "gtFine"):
            for split in ("train", "val"):
                if not (root / sub / split).is_dir():
                    raise ConfigError(where, f"not a Cityscapes directory: {root / sub / split} not found")

    def load(self, cache_dir: Path) -> DataBundle:
        self.check(cache_dir)
        root = Path(self.root).expanduser()
        h, w = self.size
        folders = tuple(f"{sub}/{split}" for sub in ("leftImg8bit", "gtFine") for split in ("train", "val"))
        fingerprint = source_fingerprint(root, folders)
        source = f"{root.resolve()}|{h}x{w}|fine"
        tag = hashlib.sha256(f"{source}|{fingerprint}".encode()).hexdigest()[:16]
        splits = cached_splits(
            cache_dir / "datasets" / f"cityscapes-{tag}.safetensors",
            lambda: (_read_cityscapes(root, "train", (h, w)), _read_cityscapes(root, "val", (h, w))),
            source,
        )
        return uint8_bundle(
            "cityscapes", splits, self.subset_train, self.subset_test, IMAGENET_MEAN, IMAGENET_STD, 19, task="segmentation"
        )


def _read_cityscapes(root: Path, split: str, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """One split as uint8 tensors: images (N, 3, H, W), train-id maps (N, H, W), in file-name order."""
    from PIL import Image
    from torchvision.datasets import Cityscapes as TorchvisionCityscapes
    from tqdm import tqdm

    where = "root"
    try:
        ds = TorchvisionCityscapes(str(root), split=split, mode="fine", target_type="semantic")
    except (RuntimeError, OSError) as exc:
        raise ConfigError(where, f"{root}: {exc}") from None
    pairs = sorted(zip(ds.images, (t[0] for t in ds.targets)))
    if not pairs:
        raise ConfigError(where, f"no images under {root / 'leftImg8bit' / split}")
    h, w = size
    table = cityscapes_train_ids().numpy()
    images = np.empty((len(pairs), h, w, 3), dtype=np.uint8)
    labels = np.empty((len(pairs), h, w), dtype=np.uint8)
    for i, (image_file, label_file) in enumerate(tqdm(pairs, desc=f"decode cityscapes {split}", unit="img", leave=False)):
        images[i] = read_image(image_file, lambda img: np.asarray(rgb8(img, image_file, where).resize((w, h), Image.BILINEAR)), where)
        ids = read_image(label_file, lambda lab: np.asarray(lab.resize((w, h), Image.NEAREST)), where)
        if ids.ndim != 2:
            raise ConfigError(where, f"{label_file}: expected a single-channel labelIds map, got shape {ids.shape}")
        labels[i] = table[ids.astype(np.int64).clip(0, 255)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels)
