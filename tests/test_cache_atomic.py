"""The training cache never hands out a half-written or damaged checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from wmbench.api import Key
from wmbench.cache import _HOST, TrainCache


def entry(cache: TrainCache, value: float):
    model = nn.Linear(3, 2)
    nn.init.constant_(model.weight, value)
    return cache.put("abc", model, Key("m", {"x": torch.ones(2)}), {"metric_value": value})


def test_a_dead_writers_temporary_directory_is_never_read_and_is_swept(tmp_path):
    cache = TrainCache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    partial = tmp_path / "models" / f".abc.{_HOST}.{dead}.x1y2"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)  # killed while writing
    assert not cache.has("abc") and cache.get("abc") is None
    entry(cache, 1.0)
    assert not partial.exists()
    assert cache.get("abc") is not None


def test_the_first_of_two_writers_wins_and_both_see_it(tmp_path):
    cache = TrainCache(tmp_path)
    first = entry(cache, 1.0)
    second = entry(cache, 2.0)
    assert second.meta == first.meta and second.directory == first.directory
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["abc"]


def test_a_tampered_checkpoint_fails_its_hash_and_is_set_aside(tmp_path):
    cache = TrainCache(tmp_path)
    stored = entry(cache, 1.0)
    raw = bytearray((stored.directory / "model.safetensors").read_bytes())
    raw[-1] ^= 1  # same size, one bit flipped
    (stored.directory / "model.safetensors").write_bytes(bytes(raw))
    assert cache.get("abc") is None
    assert [p.name.startswith("abc.damaged-") for p in (tmp_path / "models").iterdir()] == [True]


def test_a_write_that_cannot_start_names_the_target_not_its_temporary_file():
    import errno
    from pathlib import Path

    from wmbench.safe_io import write_atomic

    target = Path("/proc/wmbench-cannot-write.safetensors")  # the kernel refuses new files there
    with pytest.raises(OSError) as info:
        write_atomic(target, b"x")
    assert info.value.filename == str(target) and info.value.errno in (errno.ENOENT, errno.EACCES, errno.EROFS, errno.EPERM)
