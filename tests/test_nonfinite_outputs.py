"""An attacked model whose weights are finite but whose outputs overflow (a function-preserving
``scale`` at strength 30 on a model with large activations; a thief's blown-up copy) gets an error
figure from the argmax of NaN or infinite logits. The row says so in ``detect_note`` instead of
reporting that figure as a measured accuracy (found by probing: mnasnet0_5 on digits, one epoch,
logits ~3e27, after ``scale`` 30: every test output NaN, error_delta +2 points and no note)."""

from __future__ import annotations

import torch
from conftest import plugin_scenario, run_scenario
from torch import nn

from wmbench.metrics import nonfinite_outputs, nonfinite_outputs_note

PLUGIN = '''
from dataclasses import dataclass

import torch

from wmbench.api import Attack
from wmbench.models import weight_params
from wmbench.registry import ATTACKS


@ATTACKS.register("blow_up")
@dataclass(frozen=True)
class BlowUp(Attack):
    """Every Conv/Linear weight times 1e20: finite weights, activations past float32's range."""

    def attack(self, model, strength, ctx):
        with torch.no_grad():
            for p in weight_params(model).values():
                p.mul_(1e20)
'''


def test_an_attack_whose_outputs_overflow_says_so(tmp_path):
    (tmp_path / "atk.py").write_text(PLUGIN)
    path = plugin_scenario(tmp_path, tmp_path / "atk.py", "none, watermas", "{name: blow_up, strengths: [1.0]}, {name: scale, strengths: [1.0]}", name="s")
    code, frame = run_scenario(path, tmp_path / "c")
    assert code == 0
    blown = frame[(frame["attack"] == "blow_up") & (frame["strength"] == 1.0)]
    assert len(blown) == 2 and blown["error"].notna().all()
    assert blown["detect_note"].str.contains("outputs are non-finite (NaN or infinite) on 100 of 100 test inputs: its accuracy", regex=False).all(), blown["detect_note"].tolist()
    others = frame.drop(blown.index)
    assert not others["detect_note"].fillna("").str.contains("non-finite").any()  # clean rows and the finite scale


def test_the_count_is_per_input():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [3e38, 3e38], [0.0, 0.0]])
    with nonfinite_outputs(model) as counts, torch.no_grad():
        model(x[:2])
        model(x[2:])
    assert counts == [2, 4]  # inf in, and 3e38 + 3e38 overflowing
    assert nonfinite_outputs_note(counts, "accuracy") == "the model's outputs are non-finite (NaN or infinite) on 2 of 4 test inputs: its accuracy counts their argmax as predictions"
    assert nonfinite_outputs_note([0, 4], "accuracy") is None
    assert not model._forward_hooks  # the hook is gone
