"""A plug-in detector that reads its flat positions without checking the tensor's shape (no
``keyed_tensor``) still returns a figure after an attack that reshapes the carriers' tensors
(``dummy_neurons`` grows layers): the row published "bit accuracy 0.58, not detected" with only
the attack's own note, to be read as the attack removing the mark. The row now says the carriers'
tensors changed shape, so the figure reads other weights."""

from __future__ import annotations

import copy

import torch
from conftest import plugin_scenario, run_scenario
from torch import nn

from wmbench.carrier_change import reshaped_carriers_note

UNCHECKED = '''
import math
from dataclasses import dataclass

import torch

from wmbench.api import Detection
from wmbench.methods.uchida import Uchida
from wmbench.registry import METHODS


@METHODS.register("unchecked_positions")
@dataclass(frozen=True)
class UncheckedPositions(Uchida):
    """Uchida's mark, read back at flat positions of whatever tensor bears the name."""

    def carriers(self, key):
        shape = key.meta["shape"]
        n = shape[1] * shape[2] * shape[3]
        return {key.meta["param"]: torch.arange(n)}

    def detect(self, model, key):
        w = dict(model.named_parameters())[key.meta["param"]].detach()
        shape = key.meta["shape"]
        w_bar = w.reshape(-1)[: shape[1] * shape[2] * shape[3] * shape[0]].reshape(shape[0], -1).mean(0)  # no shape check
        bits = key.tensors["bits"].float()
        acc = float((((key.tensors["x"].float() @ w_bar) > 0).float() == bits).float().mean())
        k, n = round(acc * len(bits)), len(bits)
        p = sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
        return Detection(acc, p)
'''


def test_the_note_names_a_carrier_tensor_that_changed_shape():
    trained = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    carriers = {"0.weight": torch.tensor([0, 5])}
    assert reshaped_carriers_note(carriers, trained, copy.deepcopy(trained)) is None
    grown = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    assert reshaped_carriers_note(carriers, trained, grown) == (
        "the key's carrier tensors changed shape (0.weight 4x4 -> 6x4), yet the detector read them: "
        "its flat positions now point at other weights")
    assert reshaped_carriers_note({"2.weight": torch.tensor([0])}, trained, grown) is None  # not the model's: said elsewhere


def test_a_detector_reading_a_grown_layer_says_so_in_its_row(tmp_path):
    plugin = tmp_path / "unchecked.py"
    plugin.write_text(UNCHECKED)
    path = plugin_scenario(tmp_path, plugin, "unchecked_positions, uchida", "{name: dummy_neurons, strengths: [0.5]}", epochs=2)
    code, frame = run_scenario(path, tmp_path / "cache")
    grown = frame[(frame["attack"] == "dummy_neurons") & (frame["strength"] == 0.5)].set_index("method")
    assert grown.loc["unchecked_positions", "detect_stat"] == grown.loc["unchecked_positions", "detect_stat"], grown  # a figure
    assert "carrier tensors changed shape" in grown.loc["unchecked_positions", "detect_note"], grown["detect_note"]
    assert "carrier tensors changed shape" not in str(grown.loc["uchida", "detect_note"])  # keyed_tensor: not applicable
