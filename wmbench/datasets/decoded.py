"""Datasets read from files are decoded once into uint8 tensors and kept in the cache directory,
with the SHA-256 of their contents (recorded in each training and row as ``data_digest``). The
cache file's name includes a fingerprint of the source files (``source_fingerprint``), so editing,
adding or removing one decodes again."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
from safetensors.torch import load, save
from torch import Tensor

from wmbench.data import DataBundle, normalize, take_subset
from wmbench.errors import ConfigError
from wmbench.safe_io import read_bytes, safetensors_metadata, write_atomic

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class DecodedSplits(NamedTuple):
    """A dataset decoded once: uint8 images and labels, and the SHA-256 of them all."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    digest: str | None = None


def cached_splits(cached: Path, decode: Callable[[], tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]], source: str | None = None) -> DecodedSplits:
    """(train_x, train_y, test_x, test_y) decoded once by ``decode`` and kept in ``cached``
    (safetensors with the SHA-256 of its tensors in its metadata, written atomically). A damaged,
    truncated or edited file is decoded again and replaced. ``source`` (where and how the data was
    read) is recorded too: the decodings of the same source's earlier contents (an image edited
    since) are removed once the new one is written, so edits do not pile up copies of the dataset."""
    names = ("train_x", "train_y", "test_x", "test_y")
    stored = _read_splits(cached, names)
    if stored is not None:
        return stored
    (train_x, train_y), (test_x, test_y) = decode()
    tensors = dict(zip(names, (train_x, train_y, test_x, test_y)))
    digest = _splits_digest(tensors, names)
    write_atomic(cached, save(tensors, metadata={"sha256": digest, **({"source": source} if source else {})}))
    if source:
        _remove_superseded(cached, source)
    return DecodedSplits(train_x, train_y, test_x, test_y, digest)


def _remove_superseded(cached: Path, source: str) -> None:
    """Remove the other ``<dataset>-*.safetensors`` beside ``cached`` recorded from ``source``
    (read from their headers only); a file that cannot be read or removed is left alone."""
    prefix = cached.name.split("-", 1)[0]
    for other in cached.parent.glob(f"{prefix}-*.safetensors"):
        if other == cached:
            continue
        try:
            with open(other, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = fh.read(size) if size < 1 << 20 else b""
            raw = len(header).to_bytes(8, "little") + header
            if safetensors_metadata(raw).get("source") == source:
                other.unlink()
                log.info("%s: removed, the decoding of %s's earlier contents", other, source)
        except (OSError, ValueError):
            continue


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


def source_fingerprint(root: Path, folders: tuple[str, ...]) -> str:
    """SHA-256 of the sorted (path relative to ``root``, size, mtime_ns) of every file under
    ``root/folder`` for each folder (a missing folder counts as empty): a cheap stand-in for the
    contents, from directory listings and stats only (no file is read). Symlinks are followed, as
    torchvision's ImageFolder does; a folder that cannot be listed raises its OSError."""
    entries: list[str] = []
    for folder in folders:
        top = os.path.join(root, folder)
        for directory, subfolders, files in os.walk(top, onerror=_raise_unless_missing, followlinks=True):
            relative = os.path.join(folder, os.path.relpath(directory, top)) if directory != top else folder
            for name in subfolders:
                _check_not_a_loop(os.path.join(directory, name), top, root)
            for name in files:
                stat = _stat(os.path.join(directory, name))
                entries.append(f"{relative}/{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def _check_not_a_loop(folder: str, top: str, root: Path) -> None:
    """A ConfigError when ``folder`` is a folder the walk from ``top`` already went through on its
    way here (a link to a folder above it, or links leading to each other): walking it would
    recurse until the path is too long."""
    real, ancestor = os.path.realpath(folder), os.path.dirname(folder)
    while True:
        if os.path.realpath(ancestor) == real:
            raise ConfigError("root", f"{os.path.relpath(folder, root)}: a symbolic link back to a folder it lies in (a loop): remove it")
        if len(ancestor) <= len(top):
            return
        ancestor = os.path.dirname(ancestor)


def _stat(path: str) -> os.stat_result:
    """The file's stat, or the link's own for a dangling symlink."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return os.lstat(path)


def _raise_unless_missing(exc: OSError) -> None:
    """os.walk's error handler: a missing folder is empty (the decoder says what is missing); any
    other error of the filesystem (permission denied, I/O error) is raised."""
    if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        raise exc


# PIL modes of more than 8 bits per channel: convert("RGB") clips them (16-bit grey 75 reads as white).
WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def rgb8(img: Image, file: str | Path, where: str = "root") -> Image:
    """``img`` as 8-bit RGB; an image of more than 8 bits per channel (16-bit, 32-bit, float) is a
    ConfigError naming the file, never clipped to the wrong pixels."""
    if img.mode in WIDE_MODES:
        raise ConfigError(where, f"{file}: a {img.mode} image (more than 8 bits per channel): convert it to 8-bit RGB or greyscale first")
    return img.convert("RGB")


def read_image(file: str | Path, to_array: Callable[[Image], np.ndarray], where: str = "root") -> np.ndarray:
    """``to_array`` of the image in ``file``. Bad data (not an image, truncated, corrupt, missing)
    is a ConfigError on field ``where`` naming the file; a fault of the filesystem (permission
    denied, I/O error) stays the OSError it is."""
    import stat

    from PIL import Image as PILImage

    try:
        if not stat.S_ISREG(os.stat(file).st_mode):  # a FIFO named .jpg would block the read forever
            raise ConfigError(where, f"{file}: not a regular file")
        with PILImage.open(file) as img:
            return to_array(img)
    except FileNotFoundError as exc:
        raise ConfigError(where, f"{exc.filename or file}: no such file") from None
    except OSError as exc:
        if exc.errno is not None:  # from the filesystem, not from PIL's decoders
            raise
        raise ConfigError(where, f"{file}: not a readable image ({exc})") from None
    except (ValueError, SyntaxError, PILImage.DecompressionBombError) as exc:  # what some PIL decoders raise
        raise ConfigError(where, f"{file}: not a readable image ({exc})") from None


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
