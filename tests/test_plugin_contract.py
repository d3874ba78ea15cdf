"""What a plug-in may hand back and what it may not: tensors for floats, a key edited in place, a
detector that breaks, a name already taken, a mutable dataclass, an unknown statistic, an attack
listed without strengths. Each is either absorbed or refused at once, never a wrong row."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from wmbench.api import Attack, Detection
from wmbench.cli import EXIT_CELLS_FAILED, main
from wmbench.errors import ConfigError
from wmbench.methods.none import NoWatermark
from wmbench.registry import ATTACKS, METHODS, load_plugins
from wmbench.scenario import parse_scenario
from wmbench.summary import failed_cells


def test_a_detection_holds_plain_floats_and_a_p_value_in_0_1():
    d = Detection(torch.tensor(0.75), np.float32(0.01))
    assert type(d.stat) is float and type(d.pvalue) is float and d.stat == 0.75
    assert d.log10_pvalue == pytest.approx(-2.0)
    assert Detection(1.0, 0.0).log10_pvalue == -math.inf
    for bad in (math.nan, -0.1, 1.5):
        with pytest.raises(ValueError, match="p-value"):
            Detection(1.0, bad)


def test_registration_refuses_a_mutable_dataclass_and_an_unknown_statistic():
    with pytest.raises(TypeError, match="frozen dataclass"):
        @ATTACKS.register("mutable_probe")
        @dataclass
        class Mutable(Attack):
            def attack(self, model, strength, ctx):
                return model

    with pytest.raises(TypeError, match="statistic 'bit_error_rate'"):
        @METHODS.register("reversed_probe")
        @dataclass(frozen=True)
        class Reversed(NoWatermark):
            statistic = "bit_error_rate"

    assert "mutable_probe" not in ATTACKS.names() and "reversed_probe" not in METHODS.names()


def test_a_plugin_taking_a_builtin_name_is_a_config_error(tmp_path):
    (tmp_path / "dup.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from wmbench.api import Attack
        from wmbench.registry import ATTACKS

        @ATTACKS.register("noise")
        @dataclass(frozen=True)
        class MyNoise(Attack):
            def attack(self, model, strength, ctx):
                return model
    '''))
    with pytest.raises(ConfigError, match="already registered"):
        load_plugins(["dup.py"], tmp_path)
    assert ATTACKS.get("noise").__module__ == "wmbench.attacks.noise"  # the built-in stays


SCENARIO = {
    "name": "contract", "seeds": [0], "device": "cpu",
    "datasets": [{"name": "digits", "args": {"subset_train": 200, "subset_test": 100}}],
    "models": [{"name": "small_cnn", "args": {"width": 8, "hidden": 16}}],
    "methods": ["uchida"], "training": {"epochs": 1, "batch_size": 100},
}


def test_an_attack_must_list_its_strengths_unless_it_is_the_identity(tmp_path):
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.strengths: missing"):
        parse_scenario({**SCENARIO, "attacks": [{"name": "noise"}]}, tmp_path)
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.strengths: missing"):
        parse_scenario({**SCENARIO, "attacks": ["prune"]}, tmp_path)
    scenario = parse_scenario({**SCENARIO, "attacks": ["none"]}, tmp_path)
    assert scenario.attacks[0].strengths == (0.0,)


# An attack that flips the key's bits in place and reports its effect as a tensor, and a method
# whose detector breaks.
PLUGIN = '''
from dataclasses import dataclass

import torch

from wmbench.api import Attack
from wmbench.methods.uchida import Uchida
from wmbench.registry import ATTACKS, METHODS


@ATTACKS.register("key_vandal")
@dataclass(frozen=True)
class KeyVandal(Attack):
    """Leaves the model alone; flips every tensor of the key it was handed."""

    def attack(self, model, strength, ctx):
        for name, tensor in ctx.key.tensors.items():
            if tensor.dtype.is_floating_point:
                tensor.neg_()
            else:
                tensor.copy_(1 - tensor)
        ctx.effect = torch.tensor(strength)
        return model


@METHODS.register("broken_detector")
@dataclass(frozen=True)
class BrokenDetector(Uchida):
    def detect(self, model, key):
        raise RuntimeError("detector bug")
'''


@pytest.mark.at_chance("plumbing: a key's edits stay in their cell, a broken detector fails its rows")
def test_key_edits_stay_in_their_cell_and_a_broken_detector_fails_as_detect(tmp_path, capsys):
    (tmp_path / "vandal.py").write_text(PLUGIN)
    doc = textwrap.dedent("""
        name: contract
        seeds: [0]
        device: cpu
        plugins: [vandal.py]
        datasets: [{name: digits, args: {subset_train: 200, subset_test: 100}}]
        models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
        methods: [watermas, broken_detector]
        training: {epochs: 1, batch_size: 100}
        attacks:
          - {name: key_vandal, strengths: [1.0]}
          - {name: noise, strengths: [0.001]}
    """)
    (tmp_path / "s.yaml").write_text(doc)
    args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main(args) == EXIT_CELLS_FAILED
    frame = pd.read_csv(tmp_path / "lb" / "contract.csv")
    owner = frame[frame.method == "watermas"].set_index(["attack", "strength"])
    # the vandal ran before the noise cells; the noise cells still detect with the owner's key
    assert owner.loc[("noise", 0.001), "detected"] and owner.loc[("noise", 0.0), "detected"]
    assert owner.loc[("key_vandal", 1.0), "attack_effect"] == 1.0  # a tensor, stored as a float
    broken = frame[frame.method == "broken_detector"]
    assert len(broken) == 4 and broken["failure"].str.startswith("detect: RuntimeError: detector bug").all()
    table = failed_cells(frame)
    assert table.columns.tolist() == ["model", "dataset", "method", "attacks", "seeds", "cells", "failure"]
    assert table.loc[0, "attacks"] == "key_vandal, noise" and table.loc[0, "cells"] == 4


def test_registration_refuses_a_class_missing_an_abstract_method():
    with pytest.raises(TypeError, match="does not implement attack"):
        @ATTACKS.register("incomplete_probe")
        @dataclass(frozen=True)
        class Incomplete(Attack):
            pass
