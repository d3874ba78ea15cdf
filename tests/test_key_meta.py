"""A key's meta is written to the cache as JSON after the training: numpy scalars (a count from
numpy) are written as their Python values, and a meta JSON cannot write at all (a tensor) is refused
by the pre-flight, before any training, naming the method."""

from __future__ import annotations

import textwrap

from conftest import plugin_scenario, run_scenario

from wmbench.api import Key
from wmbench.cli import main

PLUGIN = '''  # {tag}: each test registers its own names
from dataclasses import dataclass

import numpy as np
import torch

from wmbench.methods.uchida import Uchida
from wmbench.registry import METHODS


@METHODS.register("numpy_meta_{tag}")
@dataclass(frozen=True)
class NumpyMeta(Uchida):
    def keygen(self, model, data, rng):
        key = super().keygen(model, data, rng)
        key.meta["count"] = np.int64(3)
        key.meta["share"] = np.float32(0.5)
        return key


@METHODS.register("tensor_meta_{tag}")
@dataclass(frozen=True)
class TensorMeta(Uchida):
    def keygen(self, model, data, rng):
        key = super().keygen(model, data, rng)
        key.meta["positions"] = torch.arange(3)
        return key
'''


def test_numpy_scalars_in_a_keys_meta_are_written_as_numbers(tmp_path):
    (tmp_path / "meta_plugin.py").write_text(textwrap.dedent(PLUGIN.format(tag="a")))
    code, frame = run_scenario(plugin_scenario(tmp_path, "meta_plugin.py", "numpy_meta_a"), tmp_path / "cache")
    assert code == 0 and not frame["failure"].notna().any()
    (entry,) = [d for d in (tmp_path / "cache" / "models").iterdir() if (d / "key.safetensors").is_file()]
    meta = Key.load(entry / "key.safetensors").meta
    assert meta["count"] == 3 and isinstance(meta["count"], int) and meta["share"] == 0.5


def test_a_keys_meta_json_cannot_write_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "meta_plugin.py").write_text(textwrap.dedent(PLUGIN.format(tag="b")))
    path = plugin_scenario(tmp_path, "meta_plugin.py", "tensor_meta_b", epochs=50)
    assert main(["run", str(path), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lb"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "TensorMeta.keygen's key.meta cannot be written as JSON" in err and "key.tensors" in err
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
