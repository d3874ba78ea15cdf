"""What one cell's plug-in does to shared state never reaches another cell: a method or attack that
edits the dataset in place fails its own cell (its training is not cached), an attack overriding
``apply`` without copying cannot damage the trained model other cells use, a detector that edits
the key cannot change later cells, and a fresh run reads its key as a resumed run will."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import plugin_scenario, run_scenario

PLUGIN = '''
from dataclasses import dataclass

import torch

from wmbench.api import Attack
from wmbench.methods.none import NoWatermark
from wmbench.methods.watermas import WaterMAS
from wmbench.registry import ATTACKS, METHODS


@METHODS.register("stamps_data")
@dataclass(frozen=True)
class StampsData(NoWatermark):
    """A trigger-set method done wrong: stamps a patch into the shared training images."""

    def keygen(self, model, data, rng):
        data.train_x[:50, :, :3, :3] = 3.0
        return super().keygen(model, data, rng)


@METHODS.register("tuple_meta")
@dataclass(frozen=True)
class TupleMeta(WaterMAS):
    """Keeps a tuple in its key's JSON meta (read back as a list) and reads it in detect."""

    def keygen(self, model, data, rng):
        key = super().keygen(model, data, rng)
        key.meta["shape"] = (1, 2)
        return key

    def detect(self, model, key):
        result = super().detect(model, key)
        return result if key.meta["shape"] == [1, 2] else type(result)(0.0, 1.0)


@METHODS.register("edits_key")
@dataclass(frozen=True)
class EditsKey(WaterMAS):
    """Its detector shifts the key's image by one pixel in place after reading it."""

    def detect(self, model, key):
        result = super().detect(model, key)
        pixels = key.tensors["pixels"].view(-1)
        pixels.copy_(pixels.roll(1))
        return result


@METHODS.register("claims_data")
@dataclass(frozen=True)
class ClaimsData(NoWatermark):
    def keygen(self, model, data, rng):
        key = super().keygen(model, data, rng)
        key.meta["data"] = "mine"
        return key


@ATTACKS.register("zeroes_test")
@dataclass(frozen=True)
class ZeroesTest(Attack):
    def attack(self, model, strength, ctx):
        ctx.data.test_x.mul_(0)


@ATTACKS.register("in_place")
@dataclass(frozen=True)
class InPlace(Attack):
    """Overrides apply and noises the model it is given, without copying."""

    def apply(self, model, strength, ctx):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=ctx.rng) * 10)
        return model

    def attack(self, model, strength, ctx):
        raise AssertionError("unused")
'''

@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "plugin.py"  # one file: its names register once
    path.write_text(PLUGIN)
    return path


def run(tmp_path, plugin, methods, attacks, name="shared", cache="c"):
    return run_scenario(plugin_scenario(tmp_path, plugin, methods, attacks, name), tmp_path / cache)


def clean_error(frame, method):
    return frame[(frame["method"] == method) & (frame["strength"] == 0)]["error"].iloc[0]


def test_a_method_editing_the_data_fails_its_cell_and_no_other(tmp_path, plugin):
    _, alone = run(tmp_path, plugin, "watermas", "{name: noise, strengths: [0.1]}", name="alone", cache="alone")
    code, frame = run(tmp_path, plugin, "stamps_data, watermas", "{name: noise, strengths: [0.1]}")
    assert code == 3
    failed = frame[frame["method"] == "stamps_data"]["failure"]
    assert failed.notna().all() and failed.str.contains("edited the shared digits data").all(), failed.tolist()
    assert clean_error(frame, "watermas") == clean_error(alone, "watermas")  # trained on the data as read
    assert len(list((tmp_path / "c" / "models").glob("*/meta.json"))) == 1  # watermas's; the edited training is not kept


def test_an_attack_editing_the_data_fails_its_row_and_no_other(tmp_path, plugin):
    _, alone = run(tmp_path, plugin, "watermas", "{name: noise, strengths: [0.1]}", name="alone", cache="alone")
    code, frame = run(tmp_path, plugin, "watermas", "{name: zeroes_test, strengths: [1.0]}, {name: noise, strengths: [0.1]}")
    assert code == 3
    zeroed = frame[(frame["attack"] == "zeroes_test") & (frame["strength"] == 1.0)]
    assert zeroed["failure"].str.contains("edited the shared digits data").all()
    noise = frame[frame["attack"] == "noise"].reset_index(drop=True)  # measured after it, on the data as read
    assert noise["failure"].isna().all()
    pd.testing.assert_series_equal(noise["error"], alone["error"], check_dtype=False)


def test_an_attack_overriding_apply_does_not_damage_the_trained_model(tmp_path, plugin):
    _, frame = run(tmp_path, plugin, "watermas", "{name: in_place, strengths: [1.0]}, {name: noise, strengths: [0.1]}")
    after = frame[(frame["attack"] == "noise") & (frame["strength"] == 0)]  # the trained model, as trained
    assert (after["detect_stat"] > 0.99).all() and (after["error"] == after["error_clean"]).all(), after[["error", "detect_stat"]]


def test_a_fresh_run_reads_its_key_as_a_resumed_run(tmp_path, plugin):
    """Tuples in key meta come back from storage as lists: the run that trains sees them as the
    runs that find the training cached do (they used to read r = 1 fresh, r = 0 resumed)."""
    _, fresh = run(tmp_path, plugin, "tuple_meta", "{name: noise, strengths: [0.1]}", name="first")
    _, cached = run(tmp_path, plugin, "tuple_meta", "{name: noise, strengths: [0.1]}", name="second")
    assert (fresh["detect_stat"].to_numpy() == cached["detect_stat"].to_numpy()).all()
    assert (fresh["detected"]).all()


def test_a_key_meta_entry_wmbench_owns_is_refused(tmp_path, plugin):
    code, frame = run(tmp_path, plugin, "claims_data", "{name: noise, strengths: [0.1]}")
    assert code == 3 and frame["failure"].str.contains("key.meta\\['data'\\]").all(), frame["failure"].tolist()


def test_a_detector_editing_the_key_changes_no_other_cell(tmp_path, plugin):
    _, frame = run(tmp_path, plugin, "edits_key", "{name: noise, strengths: [0.001, 0.002]}")
    assert (frame["detect_stat"] > 0.99).all(), frame[["strength", "detect_stat"]]  # every cell reads the mark as trained
