"""Synthetic data for tests: images labelled by a fixed random teacher, per image or per pixel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wmbench.api import bounded
from wmbench.data import IGNORE_INDEX, DataBundle, Dataset
from wmbench.registry import DATASETS


@DATASETS.register("synthetic")
@dataclass(frozen=True)
class Synthetic(Dataset):
    """Random images labelled by a fixed random linear teacher: for tests only."""

    n_train: int = bounded(256, ge=1)
    n_test: int = bounded(128, ge=1)
    channels: int = bounded(3, ge=1, le=64)
    size: int = bounded(8, ge=1, le=4096)
    num_classes: int = bounded(4, ge=2, le=254)
    seed: int = bounded(0, ge=0, le=2**63 - 1)

    def load(self, cache_dir: Path) -> DataBundle:
        g = torch.Generator().manual_seed(self.seed)
        n = self.n_train + self.n_test
        x = torch.randn(n, self.channels, self.size, self.size, generator=g)
        teacher = torch.randn(self.channels * self.size * self.size, self.num_classes, generator=g)
        y = (x.flatten(1) @ teacher).argmax(1)
        return DataBundle(
            "synthetic", x[: self.n_train], y[: self.n_train], x[self.n_train :], y[self.n_train :], self.num_classes
        )


@DATASETS.register("synthetic_segmentation")
@dataclass(frozen=True)
class SyntheticSegmentation(Dataset):
    """Smooth random images with per-pixel labels from a fixed rule: for tests only.

    Images are low-frequency noise (a (size/8)-pixel random field upsampled bilinearly) plus a
    little white noise; a pixel's label is the argmax of a fixed random linear map of its smooth
    channels, so a 1x1 convolution could learn it. The ``ignore_fraction`` of pixels with the
    smallest argmax margin (near class boundaries) are labelled 255 (ignored)."""

    n_train: int = bounded(16, ge=1)
    n_test: int = bounded(8, ge=1)
    channels: int = bounded(3, ge=1, le=64)
    size: int = bounded(32, ge=1, le=4096)
    num_classes: int = bounded(4, ge=2, le=254)
    ignore_fraction: float = bounded(0.05, ge=0, lt=1)
    seed: int = bounded(0, ge=0, le=2**63 - 1)

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_test < 1 or self.channels < 1 or self.size < 1:
            raise ValueError("synthetic_segmentation needs n_train, n_test, channels, size >= 1")
        if not 2 <= self.num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be in [2, {IGNORE_INDEX}), got {self.num_classes}")
        if not 0.0 <= self.ignore_fraction < 1.0:
            raise ValueError(f"ignore_fraction must be in [0, 1), got {self.ignore_fraction}")

    def load(self, cache_dir: Path) -> DataBundle:
        g = torch.Generator().manual_seed(self.seed)
        n, s = self.n_train + self.n_test, self.size
        coarse = torch.randn(n, self.channels, max(1, s // 8), max(1, s // 8), generator=g)
        smooth = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        teacher = torch.randn(self.num_classes, self.channels, generator=g)
        scores = torch.einsum("kc,nchw->nkhw", teacher, smooth)
        top2 = scores.topk(min(2, self.num_classes), dim=1).values
        y = scores.argmax(1)
        margin = top2[:, 0] - top2[:, -1]
        if self.ignore_fraction > 0:
            cut = torch.quantile(margin.flatten(), self.ignore_fraction)
            y[margin <= cut] = IGNORE_INDEX
        x = smooth + 0.1 * torch.randn(smooth.shape, generator=g)
        t = self.n_train
        return DataBundle("synthetic_segmentation", x[:t], y[:t], x[t:], y[t:], self.num_classes, task="segmentation")
