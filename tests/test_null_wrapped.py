"""The null's plain detection is the grid's (wmbench.detection.detect): an attack that wraps the
model is detected in the wrapped submodule there as in the grid, and built-in attacks (which do not
wrap) give the same null draws as the direct ``method.detect`` call the null made before."""

from __future__ import annotations

import pytest
from conftest import plugin_scenario, run_scenario

import wmbench.null
from wmbench.null import run_null
from wmbench.scenario import load_scenario

PLUGIN = '''
from dataclasses import dataclass

from torch import nn

from wmbench.api import Attack
from wmbench.registry import ATTACKS


class W(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@ATTACKS.register("wrapit")
@dataclass(frozen=True)
class WrapIt(Attack):
    """The model, wrapped (weights unchanged)."""

    def attack(self, model, strength, ctx):
        return W(model)


@ATTACKS.register("zero_in_place")
@dataclass(frozen=True)
class ZeroInPlace(Attack):
    """Overrides apply and zeroes the model it is given, in place."""

    def apply(self, model, strength, ctx):
        for p in model.parameters():
            p.data.zero_()
        return model

    def attack(self, model, strength, ctx):
        return None
'''

ATTACKS = "{name: wrapit, strengths: [1]}, {name: noise, strengths: [0.3]}, {name: permute, strengths: [1.0]}, {name: dummy_neurons, strengths: [0.5]}"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """One folder for both tests: the plug-in registers once, the trainings are shared."""
    tmp = tmp_path_factory.mktemp("nullwrap")
    (tmp / "wrapit.py").write_text(PLUGIN)
    plugin_scenario(tmp, tmp / "wrapit.py", "none, {name: watermas, args: {n_carriers: 128}}", ATTACKS, name="nullwrap")
    plugin_scenario(tmp, tmp / "wrapit.py", "none, {name: watermas, args: {n_carriers: 128}}",
                    "{name: zero_in_place, strengths: [1]}, {name: permute, strengths: [1.0]}", name="nullzero")
    return tmp


def test_the_null_detects_a_wrapped_model_as_the_grid_does(tmp):
    path = tmp / "nullwrap.yaml"
    code, df = run_scenario(path, tmp / "c")
    assert code == 0
    row = df[(df["method"] == "watermas") & (df["attack"] == "wrapit") & (df["strength"] == 1)].iloc[0]
    assert "the key's tensors found under 'inner'" in row["detect_note"] and row["detected"]
    samples = run_null(load_scenario(path), tmp / "c", "cpu", 4, progress=False)
    wrapped, clean = (samples[("small_cnn", "digits", "watermas", attack, strength)] for attack, strength in (("wrapit", 1.0), ("clean", 0.0)))
    assert wrapped.skipped == 0 and wrapped.failed == 0
    assert len(wrapped.stats) == 12 and wrapped.stats == clean.stats  # the same weights, under 'inner'


def test_builtin_attacks_give_the_null_draws_of_the_direct_detector(tmp, monkeypatch):
    scenario = load_scenario(tmp / "nullwrap.yaml")
    now = run_null(scenario, tmp / "c", "cpu", 4, progress=False)

    def direct(method, model, key, threshold, reference=None, example=None):  # the null's plain path before
        assert reference is None
        result = method.detect(model, key)
        return result.stat, result.pvalue, result.log10_pvalue, result.detected(threshold), None

    monkeypatch.setattr(wmbench.null, "detect", direct)
    before = run_null(scenario, tmp / "c", "cpu", 4, progress=False)
    builtin = [k for k in now if k[3] != "wrapit"]
    assert {k[3] for k in builtin} == {"clean", "noise", "permute", "dummy_neurons"}
    for k in builtin:
        assert (now[k].stats, now[k].pvalues, now[k].skipped, now[k].failed) == (before[k].stats, before[k].pvalues, before[k].skipped, before[k].failed), k
    assert sum(len(now[k].stats) for k in builtin) > 0


def test_an_attack_editing_its_model_in_place_leaves_the_nulls_other_draws_alone(tmp):
    """The null applies attacks as a cell does (``apply_attack``): one overriding ``apply`` gets its
    own copy, so zeroing it does not zero the unwatermarked model the next attack is drawn on."""
    alone = run_null(load_scenario(tmp / "nullwrap.yaml"), tmp / "c", "cpu", 4, progress=False)
    after_zeroing = run_null(load_scenario(tmp / "nullzero.yaml"), tmp / "c", "cpu", 4, progress=False)
    key = ("small_cnn", "digits", "watermas", "permute", 1.0)
    assert len(alone[key].stats) == 12 and after_zeroing[key].stats == alone[key].stats
