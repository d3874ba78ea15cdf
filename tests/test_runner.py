"""The runner: cached, resumable, deterministic, one row per cell, keys kept private."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest

from wmbench.results import COLUMNS, MEASURED_COLUMNS
from wmbench.runner import Runner
from wmbench.scenario import load_scenario
from wmbench.train import Trainer

SCENARIO = """
name: tiny
seeds: [0, 1]
device: cpu
datasets: [digits]
models: [{{name: small_cnn, args: {{width: 8, hidden: 16}}}}]
methods:
  - none
  - {{name: watermas, args: {{n_carriers: 256, rho: {rho}}}}}
  - {{name: watermas, label: watermas+align, args: {{n_carriers: 256, rho: {rho}, align: true}}}}
training: {{epochs: 2, batch_size: 128}}
attacks:
  - name: noise
    strengths: [0.5, 2.0]
"""


def scenario(tmp_path: Path, rho: float = 0.05):
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent(SCENARIO.format(rho=rho)))
    return load_scenario(path)


def run(tmp_path: Path, cache: str, rho: float = 0.05) -> pd.DataFrame:
    return Runner(scenario(tmp_path, rho), tmp_path / cache, progress=False).run()


def test_one_row_per_cell_in_schema_order(tmp_path):
    frame = run(tmp_path, "cache")
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 2 * 3 * 3  # seeds x methods x strengths (0 included)
    clean = frame[frame.strength == 0]
    assert (clean.error == clean.error_clean).all() and (clean.error_delta == 0).all()
    none_clean = clean[clean.method == "none"].set_index("seed").error_clean
    wm = clean[clean.method == "watermas"].set_index("seed")
    assert (wm.error_unwatermarked == none_clean).all()
    assert wm.detected.all() and not clean[clean.method == "none"].detected.any()


def test_rerun_trains_nothing_and_skips_finished_cells(tmp_path, monkeypatch):
    first = run(tmp_path, "cache")
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
    second = run(tmp_path, "cache")
    pd.testing.assert_frame_equal(first, second)
    lines = (tmp_path / "cache" / "results" / "tiny.jsonl").read_text().splitlines()
    assert len(lines) == len(first)


def test_a_new_detection_threshold_reruns_nothing_and_rejudges_every_row(tmp_path, monkeypatch):
    """The threshold used to be in every attack cell's id: changing it re-ran the whole grid's
    attacks. ``detected`` is now judged from the stored p-value at the scenario's threshold."""
    import dataclasses

    from wmbench.api import Attack

    first = run(tmp_path, "cache")
    loose = scenario(tmp_path)
    loose = dataclasses.replace(loose, detection=dataclasses.replace(loose.detection, threshold=0.9))
    monkeypatch.setattr(Attack, "apply", lambda *a, **k: pytest.fail("attacked again"))
    runner = Runner(loose, tmp_path / "cache", progress=False)
    assert runner.plan().pending == 0
    second = runner.run()
    assert (second["detected"] == (second["detect_pvalue"] < 0.9)).all()
    assert second["detected"].sum() > first["detected"].sum()  # the none rows' p-values are above 1e-6, some below 0.9
    pd.testing.assert_frame_equal(first.drop(columns="detected"), second.drop(columns="detected"))
    # the store holds verdicts of both thresholds: wmbench leaderboard judges them all at one
    from wmbench.leaderboard import read_results

    store = tmp_path / "cache" / "results" / "tiny.jsonl"
    for threshold in (1e-6, 0.9):
        frame = read_results(store, threshold)
        assert (frame["detected"] == (frame["detect_pvalue"] < threshold)).all()


def test_align_shares_the_watermas_training(tmp_path):
    run(tmp_path, "cache")
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2 * 2  # none, watermas x 2 seeds


def test_two_cold_runs_give_the_same_results(tmp_path):
    a = run(tmp_path, "a").drop(columns=MEASURED_COLUMNS)
    b = run(tmp_path, "b").drop(columns=MEASURED_COLUMNS)
    pd.testing.assert_frame_equal(a, b)


def test_changed_method_invalidates_only_its_cells(tmp_path, monkeypatch):
    run(tmp_path, "cache")
    fits = []
    original = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (fits.append(self.desc), original(self, *a, **k))[1])
    run(tmp_path, "cache", rho=0.1)
    assert len(fits) == 2 and all("/watermas/" in d for d in fits)


def test_keys_are_private_files(tmp_path):
    run(tmp_path, "cache")
    keys = list((tmp_path / "cache" / "models").glob("*/key.safetensors"))
    assert len(keys) == 4 and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)


def test_damaged_checkpoint_is_never_loaded(tmp_path):
    first = run(tmp_path, "cache")
    checkpoint = next((tmp_path / "cache" / "models").glob("*/model.safetensors"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    (tmp_path / "cache" / "results" / "tiny.jsonl").unlink()
    second = run(tmp_path, "cache")
    pd.testing.assert_frame_equal(first.drop(columns=MEASURED_COLUMNS), second.drop(columns=MEASURED_COLUMNS))


SHARED_LAYER_MODELS = '''
from dataclasses import dataclass

import torch
from torch import nn

from wmbench.models import Model
from wmbench.registry import MODELS

_STEM = nn.Conv2d(1, 8, 3, padding=1)  # built once, "for speed": every model trains the same stem
_HEAD_WEIGHT = torch.zeros(10, 32)
_LAZY = []


@MODELS.register("shared_stem_cnn")
@dataclass(frozen=True)
class SharedStem(Model):
    def build(self, data):
        return nn.Sequential(_STEM, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, data.num_classes))


@MODELS.register("shared_tensor_cnn")
@dataclass(frozen=True)
class SharedTensor(Model):
    """Wraps one module-level tensor in a new Parameter on every call: the storage is shared."""

    def build(self, data):
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, data.num_classes))
        model[4].weight = nn.Parameter(_HEAD_WEIGHT)
        return model


@MODELS.register("lazy_stem_cnn")
@dataclass(frozen=True)
class LazyStem(Model):
    """Makes its stem on the first call and keeps it for the next ones."""

    def build(self, data):
        if not _LAZY:
            _LAZY.append(nn.Conv2d(1, 8, 3, padding=1))
        return nn.Sequential(_LAZY[0], nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, data.num_classes))
'''


@pytest.fixture(scope="module")
def shared_layer_plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "shared.py"
    path.write_text(SHARED_LAYER_MODELS)
    return path


@pytest.mark.parametrize("model, shared", [("shared_stem_cnn", "0.weight"), ("shared_tensor_cnn", "4.weight"), ("lazy_stem_cnn", "0.weight")])
def test_a_model_whose_builds_share_a_parameter_is_refused_naming_it(tmp_path, capsys, monkeypatch, shared_layer_plugin, model, shared):
    """A build() returning a module-level layer trained it in every cell: seed 1's results
    depended on seed 0's training before it in the same process. Refused before any training."""
    from conftest import plugin_scenario

    from wmbench.cli import main

    path = plugin_scenario(tmp_path, shared_layer_plugin, "{name: none, args: {n_carriers: 64}}", models=model, name="shared")
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained"))
    code = main(["run", str(path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"models[0]: build() returned a model sharing parameter {shared!r} with the model another build() call returned" in err, err
