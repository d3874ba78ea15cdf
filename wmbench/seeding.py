"""Seeds: derived from a cell's identity, and applied to torch's global generators for a block."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator

import torch


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts of a cell's identity (independent of execution order)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs (CPU, and ``device`` if CUDA) for the block, then restore them."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
