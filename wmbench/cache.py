"""The training cache: one directory per trained (model, dataset, method, seed), written atomically.

``<cache>/models/<train_id>/`` holds ``model.safetensors`` (weights), ``key.safetensors`` (the
secret, mode 0600) and ``meta.json`` (clean figures, timing, and the SHA-256 of both files, checked
before every load so a damaged checkpoint is never used). ``<cache>/partial/<train_id>/`` holds the
epoch checkpoints of a training in progress, removed once it is stored.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save
from torch import nn

from wmbench.api import Key, json_value
from wmbench.errors import WmbenchError
from wmbench.names import broken_link, not_a_folder
from wmbench.safe_io import NOFOLLOW, fsync_dir, read_bytes, write_atomic


def default_cache_dir() -> Path:
    """``$WMBENCH_CACHE``, else ``$XDG_CACHE_HOME/wmbench``, else ``~/.cache/wmbench``."""
    if os.environ.get("WMBENCH_CACHE"):
        return Path(os.environ["WMBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wmbench"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, not through a symlink."""
    digest = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CHECKED_FILES = ("model.safetensors", "key.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its own ``meta_sha256``: an edited ``meta.json`` (its clean
    accuracy, its method) no longer matches the digest written with it."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def meta_problem(meta: Any) -> str | None:
    """Why a stored ``meta.json`` cannot be trusted, or None: a digest of each checkpoint file, its
    own digest (entries stored before 2026-12-05 have none), and the clean figures it publishes of
    the right types and ranges."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
        return "edited after it was stored (its digest does not match)"
    digests = meta.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(CHECKED_FILES):
        return "missing or partial sha256 digests"
    if not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in digests.values()):
        return "malformed sha256 digest"
    value = meta.get("metric_value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return "metric_value is not a number in [0, 1]"
    for field in ("train_s_per_epoch", "peak_mem_mb", "reference_images_per_s"):
        v = meta.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            return f"{field} is not a number >= 0"
    return None


def save_state(model: nn.Module, path: Path, mode: int = 0o644) -> None:
    """Weights and buffers as safetensors (CPU, contiguous; shared tensors copied), written atomically."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(path, save(state), mode)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
    """``model.load_state_dict(state, strict)``, with ``model``'s own module versions (its
    ``state_dict()._metadata``) where ``state`` has none: a state read from safetensors, or built
    as a plain dict, keeps no versions, and a module with a versioned ``_load_from_state_dict``
    (torchvision's MNASNet) refuses one without. The versions are those of the architecture being
    loaded, which the stored state was saved from."""
    if getattr(state, "_metadata", None) is None:
        versions = getattr(model.state_dict(), "_metadata", None)
        state = OrderedDict(state)
        if versions is not None:
            state._metadata = versions  # type: ignore[attr-defined]
    return model.load_state_dict(state, strict=strict)


def load_state(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``model`` (strict: every name and shape must match)."""
    try:
        state = load_file(str(path))
        load_weights(model, state)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise WmbenchError(f"{path}: not a checkpoint for this model ({exc})") from None
    return model


@dataclass
class TrainedEntry:
    directory: Path
    meta: dict[str, Any]


log = logging.getLogger(__name__)
LOCK_NOTICE_S = 10.0  # a training lock not free after this long is reported, then waited for
FOLDERS = ("models", "locks", "partial", "results", "datasets", "curves")  # what a cache holds: trainings, their locks and checkpoints, results stores, decoded datasets, curve points


def check_folders(root: Path) -> None:
    """Raise NotADirectoryError (the machine's fault, exit 4) where a file or a broken link
    (dangling or looping) stands in place of the cache folder ``root``, of a folder above it or of
    one of its ``FOLDERS``: before any work, not cell by cell, and a broken link named as one (a
    dangling ``--cache`` read "File exists" after its first training, a dangling ``models`` "Not a
    directory")."""
    for path in (root, *(root / name for name in FOLDERS)):
        blocker = not_a_folder(path)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, broken_link(blocker) or os.strerror(errno.ENOTDIR), str(blocker))


class TrainCache:
    """Store and fetch trained models and their keys by ``train_id``."""

    def __init__(self, root: Path) -> None:
        """A cache whose folders cannot be folders fails here, before any work (``check_folders``)."""
        self.root = root
        self.models_dir = root / "models"
        check_folders(root)

    def has(self, train_id: str) -> bool:
        """Whether a finished entry exists (its integrity is checked when it is fetched)."""
        return (self.models_dir / train_id / "meta.json").is_file()

    def stored_copies(self, train_id: str) -> int:
        """How many finished entries hold trainings named ``train_id``, without reading them: its
        own and those of other copies of its data (``<train_id>-data<digest>``: two entries of a
        dataset differing only in where it lies share a train_id, and each stores its own)."""
        name = re.compile(re.escape(train_id) + r"-data[0-9a-f]{16}")  # not one set aside (``<name>.damaged-...``)
        copies = self.models_dir.glob(f"{glob.escape(train_id)}-data*")
        return int(self.has(train_id)) + sum(1 for d in copies if name.fullmatch(d.name) and (d / "meta.json").is_file())

    def get(self, train_id: str, method: str | None = None) -> TrainedEntry | None:
        """The entry if present and intact (and, given ``method``, a training of that method); a
        damaged or foreign one is moved aside and reported missing."""
        directory = self.models_dir / train_id
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(read_bytes(meta_path))
            # an entry under another training's name (moved or swapped folders) is not this training
            intact = (meta_problem(meta) is None and meta.get("train_id", train_id) == train_id and (method is None or meta.get("method", method) == method)
                      and all(sha256_file(directory / f) == meta["sha256"][f] for f in CHECKED_FILES))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            intact = False
        if not intact:
            try:  # another process may have set it aside already
                os.replace(directory, directory.with_name(f"{train_id}.damaged-{os.getpid()}-{secrets.token_hex(3)}"))
            except OSError:
                pass
            return None
        return TrainedEntry(directory, meta)

    def put(self, train_id: str, model: nn.Module, key: Key, meta: dict[str, Any]) -> TrainedEntry:
        """Write model, key and meta into a temporary directory (each file fsynced), then rename the
        directory into place: an entry is complete or absent, whenever the process dies."""
        self.models_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sweep(train_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{train_id}.{_HOST}.{os.getpid()}.", dir=self.models_dir))
        try:
            save_state(model, tmp / "model.safetensors")
            key.save(tmp / "key.safetensors")
            meta = {**meta, "train_id": train_id, "sha256": {f: sha256_file(tmp / f) for f in CHECKED_FILES}}
            meta = json.loads(json.dumps(meta))  # as it will read back (tuples as lists), then sealed
            meta["meta_sha256"] = meta_digest(meta)
            # 0600: the key's digest would let others confirm a guessed key.
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode(), 0o600)
        except BaseException:  # a full disk, an interrupt: leave no temporary directory behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.models_dir / train_id
        for _ in range(2):
            try:
                os.rename(tmp, final)  # fails if another run finished the same training first
            except OSError:
                entry = self.get(train_id)  # theirs, if intact (a damaged one is set aside: retry)
                if entry is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return entry
                continue
            fsync_dir(self.models_dir)
            return TrainedEntry(final, meta)
        shutil.rmtree(tmp, ignore_errors=True)
        raise WmbenchError(f"{final}: cannot store the trained model (the path is taken)")

    def discard(self, train_id: str) -> None:
        """Remove ``train_id``'s entry (one that cannot be used)."""
        shutil.rmtree(self.models_dir / train_id, ignore_errors=True)

    def _sweep(self, train_id: str) -> None:
        """Remove temporary directories of ``train_id`` left by dead processes of this host."""
        for tmp in self.models_dir.glob(f".{train_id}.{_HOST}.*"):
            pid = tmp.name[len(f".{train_id}.{_HOST}.") :].split(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def training_lock(self, train_id: str) -> Iterator[None]:
        """Held while ``train_id`` is trained, so two runs sharing a cache train it once: the
        second waits, then finds the first's entry."""
        locks = self.root / "locks"
        locks.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{train_id}.lock"), mode=0o600)
        try:
            lock.acquire(timeout=LOCK_NOTICE_S)
        except Timeout:  # say why nothing moves (the other run may be stopped, not only slow)
            log.warning("training %s is held by another run sharing this cache (%s); waiting for it", train_id, lock.lock_file)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def checkpoints_dir(self, train_id: str) -> Path:
        """Where a training in progress keeps its epoch checkpoints (``wmbench.checkpoint``)."""
        return self.root / "partial" / train_id

    def load(self, entry: TrainedEntry, model: nn.Module) -> tuple[nn.Module, Key]:
        return load_state(model, entry.directory / "model.safetensors"), Key.load(entry.directory / "key.safetensors")


_HOST = socket.gethostname().replace(".", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def canonical_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """What json.dumps cannot write in a cell id: tuples, devices and tensors here, arguments as
    ``wmbench.api.json_value`` writes them (the same in every process)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    try:
        return json_value(value)
    except TypeError:
        raise WmbenchError(f"a component argument of type {type(value).__name__} cannot enter a cell id: use numbers, strings, lists or mappings") from None
