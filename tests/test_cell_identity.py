"""What a cell's id holds beyond its config: the code of every plug-in it runs (a chain's elements
included); and that none of it moves the ids of the built-in configurations (published stores and
users' caches stay valid)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from wmbench.api import component_config
from wmbench.grid import expand, identity
from wmbench.scenario import load_scenario

ROOT = Path(__file__).parents[1]

# Ids of scenarios/quickstart.yaml's seed-0 cells, computed before a chain's plug-in elements and
# mark-image bytes entered the ids: (training, noise at 1.0) per method label.
QUICKSTART_SEED0 = {
    "none": ("3da32b1ea77ab96d", "91ee707cd7231557"),
    "watermas": ("f1259d97e17d672f", "e9ed9f64898aab7b"),
    "watermas+align": ("f1259d97e17d672f", "9eee2cca4c6212d4"),
    "watermas+resync": ("f1259d97e17d672f", "c5221f4eaa28760d"),
    "tartaglione": ("8682b08a6cac79fd", "9f6ac9b370f1e79f"),
    "tartaglione+resync": ("8682b08a6cac79fd", "0855694191fc3e26"),
}


def test_builtin_ids_are_unchanged():
    cells = [c for c in expand(load_scenario(ROOT / "scenarios" / "quickstart.yaml")) if c.seed == 0]
    got = {c.method.label: (c.train_id, next(a.cell_id for a in c.attacks if a.label == "noise" and a.strength == 1.0)) for c in cells}
    assert {label: got[label] for label in QUICKSTART_SEED0} == QUICKSTART_SEED0
    chain = next(a.attack for a in cells[0].attacks if a.attack.name == "chain")  # built-in elements add nothing
    assert identity(chain) == component_config(chain)
    # every row of a published store (README of leaderboard/in_progress: its command's --set) is a cell of the grid
    scenario = load_scenario(ROOT / "scenarios" / "paper_table4_cpu.yaml", ["datasets[0].args.layout=imagefolder", "datasets[0].args.root=/nowhere"])
    ids = {a.cell_id for c in expand(scenario) for a in c.attacks}
    stored = [json.loads(line)["cell_id"] for line in (ROOT / "leaderboard" / "in_progress" / "paper_table4_cpu.jsonl").read_text().splitlines() if line.strip()]
    assert len(stored) == 54 and set(stored) <= ids


ATTACK = '''
from dataclasses import dataclass

import torch

from wmbench.api import Attack
from wmbench.registry import ATTACKS


@ATTACKS.register("myzero")
@dataclass(frozen=True)
class MyZero(Attack):
    """Scales the first tensor."""

    def attack(self, model, strength, ctx):
        with torch.no_grad():
            next(model.parameters()).mul_({factor})
        ctx.effect = 0.0
'''


def _attack_ids(path: Path) -> dict[str, str]:
    (cell,) = expand(load_scenario(path))
    return {f"{a.label}@{a.strength:g}": a.cell_id for a in cell.attacks} | {"train": cell.train_id}


def test_editing_a_plugin_attack_reruns_the_chains_that_use_it(tmp_path):
    plugin = tmp_path / "myatk.py"
    plugin.write_text(ATTACK.format(factor="1.0"))
    (tmp_path / "chain.yaml").write_text(textwrap.dedent("""
        name: chainplug
        seeds: [0]
        plugins: [myatk.py]
        datasets: [digits]
        models: [small_cnn]
        methods: [none]
        attacks:
          - {name: myzero, strengths: [1.0]}
          - {name: chain, label: chained, strengths: [1.0], args: {attacks: [myzero]}}
          - {name: chain, label: fixed, strengths: [1.0], args: {attacks: [noise, {name: myzero, strength: 0.5}]}}
          - {name: chain, label: nested, strengths: [1.0], args: {attacks: [{name: chain, args: {attacks: [myzero]}}]}}
          - {name: chain, label: builtin, strengths: [1.0], args: {attacks: [noise]}}
    """))
    before = _attack_ids(tmp_path / "chain.yaml")
    plugin.write_text(ATTACK.format(factor="0.0"))  # same version, new code
    os.utime(plugin, ns=(1, 1))
    after = _attack_ids(tmp_path / "chain.yaml")
    for label in ("myzero", "chained", "fixed", "nested"):
        assert after[f"{label}@1"] != before[f"{label}@1"], label
    assert after["builtin@1"] == before["builtin@1"] and after["train"] == before["train"]
