"""Datasets, decoded once and held as tensors: digits (embedded), cifar10, cityscapes, synthetic and
synthetic_segmentation (tests)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from wmbench.api import bounded, location
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS

log = logging.getLogger(__name__)

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


class DecodedSplits(NamedTuple):
    """A dataset decoded once: uint8 images and labels, and the SHA-256 of them all."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    digest: str | None = None


def cached_splits(cached: Path, decode: Callable[[], tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]) -> DecodedSplits:
    """(train_x, train_y, test_x, test_y) decoded once by ``decode`` and kept in ``cached``
    (safetensors with the SHA-256 of its tensors in its metadata, written atomically). A damaged,
    truncated or edited file is decoded again and replaced."""
    from safetensors.torch import save

    from wmbench.safe_io import write_atomic

    names = ("train_x", "train_y", "test_x", "test_y")
    stored = _read_splits(cached, names)
    if stored is not None:
        return stored
    (train_x, train_y), (test_x, test_y) = decode()
    tensors = dict(zip(names, (train_x, train_y, test_x, test_y)))
    digest = _splits_digest(tensors, names)
    write_atomic(cached, save(tensors, metadata={"sha256": digest}))
    return DecodedSplits(train_x, train_y, test_x, test_y, digest)


def _read_splits(cached: Path, names: tuple[str, ...]) -> DecodedSplits | None:
    """The stored splits if the file is whole and its digest matches; None otherwise."""
    import json

    from safetensors.torch import load

    from wmbench.safe_io import read_bytes

    try:
        raw = read_bytes(cached)
        tensors = load(raw)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        digest = (header.get("__metadata__") or {}).get("sha256")
        if set(tensors) != set(names) or not digest or digest != _splits_digest(tensors, names):
            raise ValueError("digest")
    except FileNotFoundError:
        return None
    except Exception:  # truncated, edited, foreign, not a regular file: decode again
        log.warning("%s: damaged decoded-dataset cache, decoding again", cached)
        return None
    return DecodedSplits(*(tensors[n] for n in names), digest)


def _splits_digest(tensors: dict[str, Tensor], names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def uint8_bundle(
    name: str, splits: DecodedSplits, subset_train: int | None, subset_test: int | None,
    mean: tuple[float, ...], std: tuple[float, ...], num_classes: int, task: str = "classification",
) -> DataBundle:
    """A DataBundle from uint8 images: subsets taken, pixels scaled to [0, 1] and normalised."""
    train_x, train_y, test_x, test_y, digest = splits
    train_x, train_y = take_subset(train_x, train_y, subset_train)
    test_x, test_y = take_subset(test_x, test_y, subset_test)
    return DataBundle(
        name, normalize(train_x, mean, std), train_y.long(), normalize(test_x, mean, std), test_y.long(), num_classes,
        task=task, train_u8=train_x, mean=tuple(mean), std=tuple(std), digest=digest,
    )


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images -> float, scaled to [0, 1] and standardised per channel, on ``x``'s device;
    the same values whether applied to a whole split or batch by batch."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    sd = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / sd


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
    the cache directory; normalised with the ImageNet channel statistics. ``subset_train`` and
    ``subset_test`` keep a fixed random subset."""

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
        tag = hashlib.sha256(f"{root.resolve()}|{h}x{w}|fine".encode()).hexdigest()[:16]
        splits = cached_splits(
            cache_dir / "datasets" / f"cityscapes-{tag}.safetensors",
            lambda: (_read_cityscapes(root, "train", (h, w)), _read_cityscapes(root, "val", (h, w))),
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
        try:
            with Image.open(image_file) as img:
                images[i] = np.asarray(img.convert("RGB").resize((w, h), Image.BILINEAR))
            with Image.open(label_file) as lab:
                ids = np.asarray(lab.resize((w, h), Image.NEAREST))
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(where, f"cannot read {exc.filename or image_file}: {exc}") from None
        if ids.ndim != 2:
            raise ConfigError(where, f"{label_file}: expected a single-channel labelIds map, got shape {ids.shape}")
        labels[i] = table[ids.astype(np.int64).clip(0, 255)]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels)
