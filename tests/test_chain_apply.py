"""A chain runs each element as the grid runs a single attack: an element that overrides ``apply``
(returning the attacked model) instead of ``attack`` is applied, not skipped."""

from __future__ import annotations

from conftest import plugin_scenario, run_scenario

from wmbench.grid import expand
from wmbench.scenario import load_scenario

PLUGIN = '''
import copy
from dataclasses import dataclass

import torch

from wmbench.api import Attack
from wmbench.registry import ATTACKS


@ATTACKS.register("applyover")
@dataclass(frozen=True)
class ApplyOver(Attack):
    """Zeroes every parameter of a copy, through apply; attack does nothing."""

    def apply(self, model, strength, ctx):
        model = copy.deepcopy(model)
        if strength > 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            ctx.effect = 1.0
        return model

    def attack(self, model, strength, ctx):
        return None
'''


def test_chain_applies_an_element_that_overrides_apply(tmp_path):
    plugin = tmp_path / "applyover.py"
    plugin.write_text(PLUGIN)
    path = plugin_scenario(
        tmp_path, plugin, "none, watermas",
        "{name: applyover, strengths: [1]}, {name: chain, label: chain-applyover, strengths: [1], args: {attacks: [applyover]}}",
        name="chainapply",
    )
    code, df = run_scenario(path, tmp_path / "cache")
    assert code == 0
    for method in ("none", "watermas"):
        rows = df[(df["method"] == method) & (df["strength"] == 1)].set_index("attack")
        single, chained = rows.loc["applyover"], rows.loc["chain-applyover"]
        assert chained["error"] == single["error"]
        assert chained["detected"] == single["detected"]
        assert chained["attack_effect"] == single["attack_effect"] == 1.0
    zeroed = df[(df["method"] == "watermas") & (df["strength"] == 1)]
    assert not zeroed["detected"].any()  # all weights zero: no mark left, chained or not
    chain = next(a.attack for a in expand(load_scenario(path))[0].attacks if a.label == "chain-applyover")
    assert chain.version == "1+applyover=1:apply"  # stored cells of such chains (run as no-ops) re-run
