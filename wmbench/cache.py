"""The training cache: one directory per trained (model, dataset, method, seed), written atomically.

``<cache>/models/<train_id>/`` holds ``model.safetensors`` (weights), ``key.safetensors`` (the
secret, mode 0600) and ``meta.json`` (clean figures, timing, and the SHA-256 of both files, checked
before every load so a damaged checkpoint is never used).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wmbench.api import Key
from wmbench.errors import WmbenchError


def default_cache_dir() -> Path:
    """``$WMBENCH_CACHE``, else ``$XDG_CACHE_HOME/wmbench``, else ``~/.cache/wmbench``."""
    if os.environ.get("WMBENCH_CACHE"):
        return Path(os.environ["WMBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wmbench"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_state(model: nn.Module, path: Path) -> None:
    """Weights and buffers as safetensors (CPU, contiguous; shared tensors copied)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_state(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``model`` (strict: every name and shape must match)."""
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise WmbenchError(f"{path}: not a checkpoint for this model ({exc})") from None
    return model


@dataclass
class TrainedEntry:
    directory: Path
    meta: dict[str, Any]


class TrainCache:
    """Store and fetch trained models and their keys by ``train_id``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models_dir = root / "models"

    def has(self, train_id: str) -> bool:
        """Whether a finished entry exists (its integrity is checked when it is fetched)."""
        return (self.models_dir / train_id / "meta.json").is_file()

    def get(self, train_id: str) -> TrainedEntry | None:
        """The entry if present and intact; a damaged one is moved aside and reported missing."""
        directory = self.models_dir / train_id
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            intact = all(sha256_file(directory / f) == h for f, h in meta["sha256"].items())
        except (OSError, ValueError, KeyError):
            intact = False
        if not intact:
            shutil.move(str(directory), str(directory.with_name(f"{train_id}.damaged-{os.getpid()}")))
            return None
        return TrainedEntry(directory, meta)

    def put(self, train_id: str, model: nn.Module, key: Key, meta: dict[str, Any]) -> TrainedEntry:
        """Write model, key and meta into a temporary directory, fsync, then rename into place."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{train_id}-", dir=self.models_dir))
        save_state(model, tmp / "model.safetensors")
        key.save(tmp / "key.safetensors")
        meta = {**meta, "sha256": {f: sha256_file(tmp / f) for f in ("model.safetensors", "key.safetensors")}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for f in ("model.safetensors", "meta.json"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        final = self.models_dir / train_id
        if final.exists():  # another run finished the same training first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
        return TrainedEntry(final, meta)

    def load(self, entry: TrainedEntry, model: nn.Module) -> tuple[nn.Module, Key]:
        return load_state(model, entry.directory / "model.safetensors"), Key.load(entry.directory / "key.safetensors")


def canonical_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__}")
