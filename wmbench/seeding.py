"""Seeds: derived from a cell's identity, and applied to the global generators (torch's, numpy's, Python's) for a block."""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts of a cell's identity (independent of execution order)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs (CPU, and ``device`` if CUDA), numpy's and Python's for the block,
    then restore them: what a component draws from them in the block (a plug-in's keygen calling
    ``random.random()``) depends on ``seed`` only, not on what ran before in the process."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
