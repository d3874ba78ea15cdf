"""A thief's own model, trained once per process and served again to the cells that share it.

An attack that trains a model of its own from scratch (``merge``: the stolen architecture
re-initialised and trained on the thief's share of the data) makes the same model at every strength
and against every method's model of one architecture: it reads the architecture, not the stolen
weights (except a parameter no module re-initialises, which ``fresh_copy`` re-draws with the stolen
tensor's mean and std). ``trained_once`` keeps the ``CACHE_SIZE`` models used last (copies on the
CPU) under ``thief_key``, a digest of everything such a training reads, its initial weights
included, and serves each cell a copy: the model a new training would make, bit for bit
(tests/test_attack_merge.py). The key reads every byte of the thief's data (``fingerprint``: about
0.2 s per cell for the full CIFAR-10 bundle on one core, microseconds for digits).
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from wmbench.lru import lru_get, lru_put
from wmbench.structure_key import structure_key

if TYPE_CHECKING:
    from wmbench.data import DataBundle
    from wmbench.train import TrainingConfig

# Models kept, least recently used dropped. A grid runs a training's seeds one after another, then
# the next method's: each seed (and each set of the thief's own settings) holds one thief
# (merge_digits: 3 seeds, its aligned and naive arms sharing them).
CACHE_SIZE = 8
_CACHE: OrderedDict[str, nn.Module] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def thief_key(model: nn.Module, example: Tensor, share: DataBundle, config: TrainingConfig, device: torch.device, *settings: Any) -> str | None:
    """A digest of what training ``model`` (not yet trained, in eval mode) on ``share`` under
    ``config`` reads: its structure (``wmbench.structure_key`` on ``example``), its initial state
    (each parameter's and buffer's name, bytes, shape, strides, dtype, device, requires_grad), the
    share's tensors (``DataBundle.fingerprint``, shapes and dtypes) and normalisation, the
    configuration, the device, torch's thread count and determinism setting, and ``settings``
    (the attack's configuration, the seed, the generator's state). None where the structure has no
    key: the model is then trained every time."""
    structure = structure_key(model, example)
    if structure is None:
        return None
    parts = (
        structure[0],
        _state_digest(model),
        _data_digest(share),
        repr(config),
        str(device),
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        settings,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def trained_once(key: str | None, train: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """A copy, on ``device``, of the model stored under ``key``; else ``train()``'s model, a copy of
    which is stored (on the CPU). A None ``key`` trains and stores nothing."""
    if key is None:
        return train()
    found = lru_get(_CACHE, _CACHE_LOCK, key)
    if found is not None:
        return copy.deepcopy(found).to(device)
    model = train()
    kept = copy.deepcopy(model).to("cpu")
    lru_put(_CACHE, _CACHE_LOCK, key, kept, CACHE_SIZE)
    return model


def clear() -> None:
    """Forget every stored model."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(repr((name, tuple(t.shape), t.stride(), str(t.dtype), str(t.device), t.requires_grad)).encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _data_digest(data: DataBundle) -> tuple[Any, ...]:
    tensors = [None if t is None else (tuple(t.shape), str(t.dtype)) for t in (data.train_x, data.train_y, data.test_x, data.test_y, data.train_u8)]
    return (data.name, data.task, data.num_classes, data.mean, data.std, data.digest, tensors, data.fingerprint())
