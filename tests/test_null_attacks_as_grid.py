"""The null attacks its unwatermarked models through the grid's own step (``CellWorker.attacked``):
an attack returning a float16 copy is measured at the trained model's precision, a key-aware attack
gets a copy of the key, and one that edits the shared data is caught, as in a cell of the grid."""

from __future__ import annotations

import pytest
from conftest import plugin_scenario, run_scenario

from wmbench.errors import DataEdited
from wmbench.null import run_null
from wmbench.scenario import load_scenario

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

from wmbench.api import Attack, Detection
from wmbench.methods.watermas import WaterMAS
from wmbench.registry import ATTACKS, METHODS


@METHODS.register("nullgrid_dtype_sum")
@dataclass(frozen=True)
class DtypeSum(WaterMAS):
    """WaterMAS's training, with a detector whose statistic is computed in the weights' own dtype
    (the sum of every weight, rounded as that dtype rounds it) and mixed with the key's image."""

    def detect(self, model, key):
        total = sum(p.detach().sum() for p in model.parameters())
        return Detection(float(total) + float(key.tensors["pixels"].view(-1)[0]), 0.5)


@ATTACKS.register("nullgrid_to_half")
@dataclass(frozen=True)
class ToHalf(Attack):
    """A thief's float16 copy."""

    def attack(self, model, strength, ctx):
        return model.half()


@ATTACKS.register("nullgrid_rounded_to_half")
@dataclass(frozen=True)
class RoundedToHalf(Attack):
    """The same weights, rounded to float16 and cast back by the attack itself."""

    def attack(self, model, strength, ctx):
        return model.half().float()


@ATTACKS.register("nullgrid_edits_key")
@dataclass(frozen=True)
class EditsKey(Attack):
    """Reads the key (so it is applied once per null key) and shifts its image in place; the model
    is left as it is."""

    uses_key: ClassVar[bool] = True

    def attack(self, model, strength, ctx):
        ctx.key.tensors["pixels"].add_(100.0)


@ATTACKS.register("nullgrid_zeroes_test")
@dataclass(frozen=True)
class ZeroesTest(Attack):
    def attack(self, model, strength, ctx):
        ctx.data.test_x.mul_(0)
'''

ATTACKS = "{name: nullgrid_to_half, strengths: [1]}, {name: nullgrid_rounded_to_half, strengths: [1]}, {name: nullgrid_edits_key, strengths: [1]}"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nullgrid")
    (tmp / "plugin.py").write_text(PLUGIN)
    plugin_scenario(tmp, tmp / "plugin.py", "none, {name: nullgrid_dtype_sum, args: {n_carriers: 64}}", ATTACKS, name="nullgrid")
    plugin_scenario(tmp, tmp / "plugin.py", "none, {name: nullgrid_dtype_sum, args: {n_carriers: 64}}",
                    "{name: nullgrid_zeroes_test, strengths: [1]}", name="nulldata")
    return tmp


def test_the_null_measures_a_half_precision_copy_as_the_grid_does(tmp):
    path = tmp / "nullgrid.yaml"
    code, frame = run_scenario(path, tmp / "c")
    assert code == 0
    half = frame[(frame["method"] == "nullgrid_dtype_sum") & (frame["attack"] == "nullgrid_to_half") & (frame["strength"] == 1)].iloc[0]
    rounded = frame[(frame["method"] == "nullgrid_dtype_sum") & (frame["attack"] == "nullgrid_rounded_to_half") & (frame["strength"] == 1)].iloc[0]
    assert "returned torch.float16 weights: evaluated in float32" in half["detect_note"]
    assert half["detect_stat"] == rounded["detect_stat"]  # the grid: the rounded weights, in float32
    samples = run_null(load_scenario(path), tmp / "c", "cpu", 3, progress=False)
    draws = {attack: samples[("small_cnn", "digits", "nullgrid_dtype_sum", attack, 1.0 if attack != "clean" else 0.0)] for attack in ("clean", "nullgrid_to_half", "nullgrid_rounded_to_half", "nullgrid_edits_key")}
    assert all(len(d.stats) == 9 and d.failed == 0 for d in draws.values())
    assert draws["nullgrid_to_half"].stats == draws["nullgrid_rounded_to_half"].stats  # the null too (it summed in float16)
    assert draws["nullgrid_to_half"].stats != draws["clean"].stats
    assert draws["nullgrid_edits_key"].stats == draws["clean"].stats  # the attack edited a copy of the key, not the null's


def test_the_null_catches_an_attack_that_edits_the_shared_data(tmp):
    with pytest.raises(DataEdited, match="attack 'nullgrid_zeroes_test' .*edited the shared digits data"):
        run_null(load_scenario(tmp / "nulldata.yaml"), tmp / "c", "cpu", 2, progress=False)
