"""The data contract: what a dataset component returns (``DataBundle``) and the helpers that build
one. The built-in datasets are in ``wmbench.datasets``, one module each."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from wmbench.seeding import seeded

IGNORE_INDEX = 255  # segmentation labels: pixels that the loss and mIoU leave out


@dataclass
class DataBundle:
    """Train and test tensors of one dataset; images are float (N, C, H, W), labels int64: (N,) for
    ``task="classification"``, (N, H, W) per-pixel for ``task="segmentation"``, where the label
    ``IGNORE_INDEX`` (255) marks pixels that neither the loss nor the metric counts."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    task: str = "classification"
    # The same training images as uint8 (N, C, H, W) with the channel statistics that turn them
    # into train_x (``normalize``): the fast path holds these on the training device (4x smaller).
    train_u8: Tensor | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # SHA-256 of the decoded data, for datasets read from files (whose path is not in the cell
    # ids): a cached training made from other data under the same ids is refused.
    digest: str | None = None

    def tensor_versions(self) -> tuple[tuple[int, int], ...]:
        """(identity, in-place version counter) of each tensor: a torch in-place edit (``add_``,
        item assignment, ``copy_``) or a reassignment changes it; a cheap way to notice that a
        plug-in edited the bundle shared by every cell of a run. An edit that bypasses the counter
        (through ``.numpy()``, ``.data`` or a raw pointer) leaves it as it was: ``fingerprint``."""
        return tuple((id(t), t._version) for t in self._tensors())

    def fingerprint(self) -> tuple[int, ...]:
        """The CRC-32 of each tensor's bytes: changed by any edit of the contents, also one the
        version counter misses (``.numpy()``, ``.data``). It reads every byte: about 0.2 s for
        the full CIFAR-10 bundle (891 MB) on one core, microseconds for digits."""
        return tuple(zlib.crc32(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()) for t in self._tensors())

    def _tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.train_x, self.train_y, self.test_x, self.test_y, self.train_u8) if t is not None)

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

    def check(self, cache_dir: Path) -> None:
        """Raise ConfigError (naming the field) when files ``load`` needs are missing; cheap, run
        by ``wmbench run`` before any work and by ``--dry-run``. Default: nothing to check."""

    def needs_download(self, cache_dir: Path) -> bool:
        """Whether ``load`` would download the data (``--dry-run`` then reads nothing). Default: no."""
        return False


LOAD_SEED = 0  # the global generators' seed while a dataset loads: one that draws from them draws the same in every process


def load_seeded(dataset: Dataset, cache_dir: Path) -> DataBundle:
    """``dataset.load(cache_dir)`` with torch's, numpy's and Python's global generators seeded with
    ``LOAD_SEED`` (and left as they were): a plug-in dataset that splits or generates its data with
    them, without a generator of its own, gives the same data in every process (a rerun, a resumed
    run, each Ray worker), so a cached model is measured on the test split it was trained beside."""
    with seeded(LOAD_SEED, torch.device("cpu")):
        return dataset.load(cache_dir)


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


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images -> float, scaled to [0, 1] and standardised per channel, on ``x``'s device;
    the same values whether applied to a whole split or batch by batch."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / sd


HOLDOUT_SEED = 0  # one fixed slice, so that every recipe and seed is measured on the same images


def train_subset(data: DataBundle, keep: Tensor) -> DataBundle:
    """The bundle with only the training images ``keep`` (their uint8 copy too, which the fast
    path trains from); the test split unchanged."""
    return replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep], train_u8=None if data.train_u8 is None else data.train_u8[keep])


def share_indices(n: int, fraction: float, generator: torch.Generator) -> Tensor:
    """A random ``fraction`` of ``range(n)`` (at least 2 indices), drawn from ``generator``."""
    return torch.randperm(n, generator=generator)[: max(2, int(n * fraction))]


def random_share(data: DataBundle, fraction: float, generator: torch.Generator) -> DataBundle:
    """The bundle with a random ``fraction`` of its training images (``share_indices``): what a
    thief holding part of the data trains on; ``data`` itself for a fraction of 1."""
    return data if fraction >= 1.0 else train_subset(data, share_indices(len(data.train_x), fraction, generator))


def hold_out(data: DataBundle, n: int) -> DataBundle:
    """The bundle with ``n`` training images (drawn once, with ``HOLDOUT_SEED``) moved to the test
    split and the test set left out: for choosing a recipe without looking at the test set."""
    total = len(data.train_y)
    if not 1 <= n <= total - 2:
        raise ValueError(f"a hold-out of {n} images needs 1 <= n <= {total - 2} (the training split has {total})")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    keep, held = order[n:].sort().values, order[:n].sort().values
    return replace(train_subset(data, keep), test_x=data.train_x[held], test_y=data.train_y[held])
