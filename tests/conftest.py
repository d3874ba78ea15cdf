"""Shared fixtures: the embedded digits data and small models trained on it for a few epochs."""

from __future__ import annotations

import os

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
