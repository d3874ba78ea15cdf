"""scikit-learn's handwritten digits: embedded, no download (tests and the quickstart)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wmbench.api import bounded
from wmbench.data import DataBundle, Dataset, standardize, take_subset
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS


@DATASETS.register("digits")
@dataclass(frozen=True)
class Digits(Dataset):
    """scikit-learn's handwritten digits: 1797 8x8 grayscale images, 10 classes, no download.

    A fixed stratified 80/20 split, standardised with the training set's statistics."""

    test_fraction: float = bounded(0.2, gt=0, lt=1)
    subset_train: int | None = bounded(None, ge=1)
    subset_test: int | None = bounded(None, ge=1)

    def load(self, cache_dir: Path) -> DataBundle:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        n, classes = len(digits.target), 10
        n_test = math.ceil(self.test_fraction * n)  # as train_test_split rounds it
        if not classes <= n_test <= n - classes:
            raise ConfigError("test_fraction", f"{self.test_fraction} puts {n_test} of {n} images in the test split: "
                              f"each split needs at least one image per class (test_fraction between {classes / n:.4f} and {1 - classes / n:.4f})")
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        idx_train, idx_test = train_test_split(
            np.arange(len(y)), test_size=self.test_fraction, random_state=0, stratify=digits.target
        )
        train_x, test_x = standardize(x[idx_train], x[idx_test])
        train_x, train_y = take_subset(train_x, y[idx_train], self.subset_train)
        test_x, test_y = take_subset(test_x, y[idx_test], self.subset_test)
        return DataBundle("digits", train_x, train_y, test_x, test_y, 10)
