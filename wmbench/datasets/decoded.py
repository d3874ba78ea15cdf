"""Datasets read from files are decoded once into uint8 tensors and kept in the cache directory,
with the SHA-256 of their contents (recorded in each training and row as ``data_digest``)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, NamedTuple

from safetensors.torch import load, save
from torch import Tensor

from wmbench.data import DataBundle, normalize, take_subset
from wmbench.safe_io import read_bytes, safetensors_metadata, write_atomic

log = logging.getLogger(__name__)


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
    try:
        raw = read_bytes(cached)
        tensors = load(raw)
        digest = safetensors_metadata(raw).get("sha256")
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
