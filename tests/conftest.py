"""Shared fixtures: the embedded digits data and small models trained on it for a few epochs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from wmbench.api import Key
from wmbench.data import DataBundle
from wmbench.errors import AT_CHANCE_NOTE
from wmbench.registry import DATASETS, METHODS, MODELS
from wmbench.train import Trainer, TrainingConfig

pytest_plugins = ["pytester"]  # test_at_chance runs this file's at-chance guard in a pytest of its own

CPU = torch.device("cpu")

# Every training and curve measures the machine's reference speed once per process; a short probe
# keeps the suite fast (Ray's workers inherit it). Tests of the probe set their own.
os.environ.setdefault("WMBENCH_PROBE_SECONDS", "0.2")

# A scenario small enough for CLI tests: 2 trainings of 24 steps on 400 digits, 4 cells. Batches of
# 50 at lr 0.3 take small_cnn well above chance in 3 epochs (40-67% over seeds, about 0.1 s a
# training; one epoch at the defaults' lr 0.05 left it at 10%): see ``_learned``.
TINY_SCENARIO = """
name: {name}
seeds: [0]
device: cpu
datasets: [{{name: digits, args: {{subset_train: 400}}}}]
models: [{{name: small_cnn, args: {{width: 8, hidden: 16}}}}]
methods: [none, {{name: watermas, args: {{n_carriers: 128}}}}]
training: {{epochs: 3, batch_size: 50, lr: 0.3}}
attacks: [{{name: noise, strengths: [1.0]}}]
"""


# A scenario around a plug-in file under test: one seed of digits, a small CNN, the given entries;
# by default batches of 25 at lr 0.1 for 8 epochs (64 steps: small_cnn at 57% or more, median 76-78%, on the 100 test images over
# 20 seeds, none and watermas; 5 epochs of 50 at lr 0.3 reached 29-30% in the worst seeds, at the chance bound).
PLUGIN_SCENARIO = """
name: {name}
seeds: [0]
device: cpu
plugins: [{plugin}]
datasets: [{{name: digits, args: {{subset_train: 200, subset_test: 100}}}}]
models: [{models}]
methods: [{methods}]
training: {{epochs: {epochs}, batch_size: {batch_size}, lr: {lr}}}
attacks: [{attacks}]
"""


def plugin_scenario(
    tmp_path: Path, plugin: Path, methods: str, attacks: str = "{name: noise, strengths: [0.1]}", name: str = "edges",
    models: str = "{name: small_cnn, args: {width: 8, hidden: 16}}", epochs: int = 8, batch_size: int = 25, lr: float = 0.1,
) -> Path:
    """Write PLUGIN_SCENARIO with these entries (YAML flow text) to ``tmp_path/<name>.yaml``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(PLUGIN_SCENARIO.format(name=name, plugin=plugin, models=models, methods=methods, attacks=attacks, epochs=epochs, batch_size=batch_size, lr=lr))
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


class _AtChanceLog(logging.Handler):
    """The at-chance warnings (``CellWorker.warn_at_chance``) logged since the current test's setup began."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if AT_CHANCE_NOTE in record.getMessage():
            self.messages.append(record.getMessage())


_AT_CHANCE = _AtChanceLog()
logging.getLogger("wmbench").addHandler(_AT_CHANCE)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _AT_CHANCE.messages.clear()  # before the item's fixtures: a module fixture's training counts for its first test


@pytest.fixture(autouse=True)
def _learned(request: pytest.FixtureRequest):
    """A test whose grid trains a model left at chance accuracy fails: it cannot judge whether a mark
    survives an attack, or what an attack costs, for the right reasons. A test that only checks
    plumbing (a row is written, an error is raised) says so: ``@pytest.mark.at_chance("why")``.
    Only this process's log is seen (not Ray workers' nor a subprocess's)."""
    yield
    marker = request.node.get_closest_marker("at_chance")
    if marker is not None and not (marker.args and str(marker.args[0]).strip()):
        pytest.fail("@pytest.mark.at_chance needs its reason: why this test may train a model at chance accuracy")
    if _AT_CHANCE.messages and marker is None:
        pytest.fail("a model of this test's grid is at chance accuracy, so its assertions on detection, robustness or cost "
                    "judge a model that did not learn: train it longer or at a higher lr (as conftest's TINY_SCENARIO does), "
                    "or mark a plumbing-only test @pytest.mark.at_chance(\"why\"). Warned: " + "; ".join(_AT_CHANCE.messages[:3]))
