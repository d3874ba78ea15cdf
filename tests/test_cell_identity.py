"""What a cell's id holds beyond its config: the code of every plug-in it runs (a chain's elements
included) and the bytes of a user's mark image; and that none of it moves the ids of the built-in
configurations (published stores and users' caches stay valid)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wmbench.api import component_config
from wmbench.errors import ConfigError
from wmbench.grid import expand, identity
from wmbench.scenario import load_scenario

ROOT = Path(__file__).parents[1]

# Ids of scenarios/quickstart.yaml's seed-0 cells, computed before a chain's plug-in elements and
# mark-image bytes entered the ids: (training, noise at 1.0) per method label. The +resync cells'
# ids moved on purpose with wmbench.resync.VERSION 2 (2026-12-05; they held 'resync': True, ids
# c5221f4eaa28760d and 0855694191fc3e26) and again with VERSION 3 (the consumers' check on an
# assignment that moves units; VERSION 2's ids a8ca4c2ef63b2606 and 7497782ed06242d6) and with
# VERSION 4 (ReLU-rule factors undone on a model torch-pruning cannot trace; VERSION 3's ids
# accd7be2add6d3e1 and 9614e34b4e96b6c0): a changed matching re-runs their stored rows.
QUICKSTART_SEED0 = {
    "none": ("3da32b1ea77ab96d", "91ee707cd7231557"),
    "watermas": ("f1259d97e17d672f", "e9ed9f64898aab7b"),
    "watermas+align": ("f1259d97e17d672f", "9eee2cca4c6212d4"),
    "watermas+resync": ("f1259d97e17d672f", "8aca336108c167ce"),
    "tartaglione": ("8682b08a6cac79fd", "9f6ac9b370f1e79f"),
    "tartaglione+resync": ("8682b08a6cac79fd", "d7a405292b0eff0b"),
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


def test_a_new_resync_version_reruns_the_resync_cells_only(monkeypatch):
    """Resync's matching is code, not configuration: its VERSION is in a +resync cell's id, so a
    store's rows made by an older matching are run again; training ids and other cells stay."""
    import wmbench.resync

    def ids() -> dict[tuple[str, str], str]:
        cells = [c for c in expand(load_scenario(ROOT / "scenarios" / "quickstart.yaml")) if c.seed == 0]
        return {(c.method.label, "train"): c.train_id for c in cells} | {(c.method.label, a.label): a.cell_id for c in cells for a in c.attacks if a.strength == 1.0}

    before = ids()
    monkeypatch.setattr(wmbench.resync, "VERSION", "next")
    after = ids()
    changed = {key for key in before if before[key] != after[key]}
    assert changed and all(label.endswith("+resync") and what != "train" for label, what in changed)
    assert len(changed) == len([key for key in before if key[0].endswith("+resync") and key[1] != "train"])


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


def _write_image(path: Path, invert: bool = False) -> None:
    pixels = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8
    Image.fromarray(255 - pixels if invert else pixels).save(path)
    os.utime(path, ns=(2, 2) if invert else (1, 1))


def test_editing_a_mark_image_trains_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # image paths are read from the working directory
    _write_image(tmp_path / "mark.png")
    (tmp_path / "img.yaml").write_text(textwrap.dedent("""
        name: imgstale
        seeds: [0]
        datasets: [digits]
        models: [small_cnn]
        methods:
          - {name: watermas, label: wm-file, args: {image: mark.png, n_carriers: 64}}
          - {name: tartaglione, label: tart-file, args: {image: mark.png, n_carriers: 64}}
          - {name: none, label: none-file, args: {image: mark.png, n_carriers: 64}}
          - {name: watermas, label: wm-default, args: {n_carriers: 64}}
        attacks: [{name: noise, strengths: [1.0]}]
    """))

    def ids() -> dict[str, tuple[str, tuple[str, ...]]]:
        return {c.method.label: (c.train_id, tuple(a.cell_id for a in c.attacks)) for c in expand(load_scenario(tmp_path / "img.yaml"))}

    before = ids()
    _write_image(tmp_path / "mark.png", invert=True)  # the same file name, other pixels
    after = ids()
    assert after["wm-file"][0] != before["wm-file"][0] and after["tart-file"][0] != before["tart-file"][0]
    # none's image is key-only: one training whatever the image; its key, so its attack cells, change
    assert after["none-file"][0] == before["none-file"][0] and set(after["none-file"][1]).isdisjoint(before["none-file"][1])
    assert after["wm-default"] == before["wm-default"]
    # the default image (none given) adds nothing to the id
    default = next(c for c in expand(load_scenario(tmp_path / "img.yaml")) if c.method.label == "wm-default").method.obj
    assert identity(default) == component_config(default)


def test_an_image_that_cannot_be_read_when_ids_are_made_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_image(tmp_path / "mark.png")
    (tmp_path / "s.yaml").write_text("name: s\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [{name: watermas, args: {image: mark.png}}]\n")
    scenario = load_scenario(tmp_path / "s.yaml")
    (tmp_path / "mark.png").unlink()
    with pytest.raises(ConfigError, match="image: cannot read mark.png"):
        expand(scenario)
