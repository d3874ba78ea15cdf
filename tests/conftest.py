"""Shared fixtures: the embedded digits data and small models trained on it for a few epochs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from wmbench.api import Key
from wmbench.data import DataBundle
from wmbench.registry import DATASETS, METHODS, MODELS
from wmbench.train import Trainer, TrainingConfig

CPU = torch.device("cpu")

# Every training and curve measures the machine's reference speed once per process; a short probe
# keeps the suite fast (Ray's workers inherit it). Tests of the probe set their own.
os.environ.setdefault("WMBENCH_PROBE_SECONDS", "0.2")

# A scenario small enough for CLI tests: 2 trainings of one epoch on 400 digits, 4 cells.
TINY_SCENARIO = """
name: {name}
seeds: [0]
device: cpu
datasets: [{{name: digits, args: {{subset_train: 400}}}}]
models: [{{name: small_cnn, args: {{width: 8, hidden: 16}}}}]
methods: [none, {{name: watermas, args: {{n_carriers: 128}}}}]
training: {{epochs: 1}}
attacks: [{{name: noise, strengths: [1.0]}}]
"""


# A scenario around a plug-in file under test: one seed of digits, a small CNN, the given entries.
PLUGIN_SCENARIO = """
name: {name}
seeds: [0]
device: cpu
plugins: [{plugin}]
datasets: [{{name: digits, args: {{subset_train: 200, subset_test: 100}}}}]
models: [{models}]
methods: [{methods}]
training: {{epochs: {epochs}, batch_size: {batch_size}}}
attacks: [{attacks}]
"""


def plugin_scenario(
    tmp_path: Path, plugin: Path, methods: str, attacks: str = "{name: noise, strengths: [0.1]}", name: str = "edges",
    models: str = "{name: small_cnn, args: {width: 8, hidden: 16}}", epochs: int = 1, batch_size: int = 100,
) -> Path:
    """Write PLUGIN_SCENARIO with these entries (YAML flow text) to ``tmp_path/<name>.yaml``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(PLUGIN_SCENARIO.format(name=name, plugin=plugin, models=models, methods=methods, attacks=attacks, epochs=epochs, batch_size=batch_size))
    return path


def run_scenario(path: Path, cache: Path) -> tuple[int, pd.DataFrame]:
    """``wmbench run`` (quiet) into ``<path's folder>/lb``: its exit code and its leaderboard CSV."""
    from wmbench.cli import main

    code = main(["run", str(path), "--cache", str(cache), "--out", str(path.parent / "lb"), "-q"])
    return code, pd.read_csv(path.parent / "lb" / f"{path.stem}.csv")


def train_small(data: DataBundle, method_name: str, epochs: int = 4, seed: int = 0, **args) -> tuple[torch.nn.Module, Key]:
    """small_cnn trained on ``data`` with a registered method; returns (model, key)."""
    torch.manual_seed(seed)
    model = MODELS.build("small_cnn").build(data)
    trainer = Trainer(data, TrainingConfig(epochs=epochs, lr=0.05), CPU, torch.Generator().manual_seed(seed), progress=False)
    key = METHODS.build(method_name, args).embed(model, trainer, torch.Generator().manual_seed(seed + 1))
    return model.eval(), key


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return DATASETS.build("digits").load(None)


@pytest.fixture(scope="session")
def watermas_model(digits):
    return train_small(digits, "watermas")


@pytest.fixture(scope="session")
def none_model(digits):
    return train_small(digits, "none")
