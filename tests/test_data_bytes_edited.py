"""An edit of the shared data that torch's version counter misses (through ``.numpy()`` or
``.data``) is caught by the fingerprint of its bytes: after a method's keygen or training its cell
fails with DataEdited, and before each training (an attack's or detector's edit, which the cells
after it check by version only) the data is read again."""

from __future__ import annotations

import pytest
from conftest import plugin_scenario, run_scenario

PLUGIN = '''
from dataclasses import dataclass

from wmbench.api import Attack
from wmbench.methods.none import NoWatermark
from wmbench.registry import ATTACKS, METHODS


@METHODS.register("stamps_numpy")
@dataclass(frozen=True)
class StampsNumpy(NoWatermark):
    """Stamps a patch into the shared training images through a numpy view (no version bump)."""

    def keygen(self, model, data, rng):
        data.train_x.numpy()[:50, :, :3, :3] = 3.0
        return super().keygen(model, data, rng)


@METHODS.register("relabels_data")
@dataclass(frozen=True)
class RelabelsData(NoWatermark):
    """Relabels shared training examples through ``.data`` (its own version counter)."""

    def keygen(self, model, data, rng):
        data.train_y.data[:50] = 0
        return super().keygen(model, data, rng)


@ATTACKS.register("zeroes_test_numpy")
@dataclass(frozen=True)
class ZeroesTestNumpy(Attack):
    """Zeroes the shared test images through a numpy view, in the cells of watermas's training."""

    def attack(self, model, strength, ctx):
        if ctx.method.name == "watermas":
            ctx.data.test_x.numpy()[:] = 0
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "plugin.py"  # one file: its names register once
    path.write_text(PLUGIN)
    return path


def run(tmp_path, plugin, methods, attacks, name, cache):
    return run_scenario(plugin_scenario(tmp_path, plugin, methods, attacks, name), tmp_path / cache)


def clean_error(frame, method):
    return frame[(frame["method"] == method) & (frame["strength"] == 0)]["error"].iloc[0]


def test_a_method_editing_the_data_through_numpy_or_data_fails_its_cell(tmp_path, plugin):
    _, alone = run(tmp_path, plugin, "watermas", "{name: noise, strengths: [0.1]}", "alone", "alone")
    code, frame = run(tmp_path, plugin, "stamps_numpy, relabels_data, watermas", "{name: noise, strengths: [0.1]}", "shared", "c")
    assert code == 3
    for method in ("stamps_numpy", "relabels_data"):
        failed = frame[frame["method"] == method]["failure"]
        assert failed.notna().all() and failed.str.contains(f"method '{method}' edited the shared digits data").all(), failed.tolist()
    assert frame[frame["method"] == "watermas"]["failure"].isna().all()
    assert clean_error(frame, "watermas") == clean_error(alone, "watermas")  # trained and measured on the data as read
    assert len(list((tmp_path / "c" / "models").glob("*/meta.json"))) == 1  # watermas's; the edited trainings are not kept


def test_the_next_training_reads_the_data_again_after_an_attack_edited_it_through_numpy(tmp_path, plugin, caplog):
    _, alone = run(tmp_path, plugin, "uchida", "{name: noise, strengths: [0.1]}", "alone", "alone")
    code, frame = run(tmp_path, plugin, "watermas, uchida", "{name: zeroes_test_numpy, strengths: [1.0]}, {name: noise, strengths: [0.1]}", "shared", "c")
    uchida = frame[frame["method"] == "uchida"]
    assert uchida["failure"].isna().all()
    noise = uchida[uchida["attack"] == "noise"].reset_index(drop=True)  # measured on the test images as read, not the zeroed ones
    assert noise["error"].tolist() == alone["error"].tolist()
    assert (uchida[uchida["attack"] == "zeroes_test_numpy"]["error"] == clean_error(alone, "uchida")).all()  # the same model, on them too
    assert "an attack or detector of an earlier cell edited the shared digits data" in caplog.text
