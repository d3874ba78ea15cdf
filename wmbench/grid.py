"""A scenario's grid: training cells (model x dataset x method x seed), each with its attack cells.

A cell's identity is a hash of its canonical config and the versions of the components involved,
so changing a method invalidates exactly that method's cells.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wmbench.api import Attack, Method, component_config
from wmbench.cache import canonical_hash
from wmbench.data import Dataset
from wmbench.models import Model
from wmbench.scenario import Component, Scenario

# Bump when the meaning of a stored training changes (trainer, checkpoint layout).
TRAIN_FORMAT = 1


@dataclass(frozen=True)
class AttackCell:
    cell_id: str
    label: str
    attack: Attack
    strength: float


@dataclass(frozen=True)
class TrainCell:
    train_id: str
    seed: int
    model: Component[Model]
    dataset: Component[Dataset]
    method: Component[Method]
    attacks: tuple[AttackCell, ...]


def expand(scenario: Scenario) -> list[TrainCell]:
    """Every training cell of the grid, `none` methods first (their figures feed other rows)."""
    methods = sorted(scenario.methods, key=lambda m: m.obj.name != "none")
    cells = []
    for dataset in scenario.datasets:
        for model in (m for m in scenario.models if m.pairs_with(dataset.label)):
            for method in methods:
                for seed in scenario.seeds:
                    method_config = component_config(method.obj)
                    train_id = canonical_hash(
                        {
                            "format": TRAIN_FORMAT,
                            "model": component_config(model.obj),
                            "dataset": component_config(dataset.obj),
                            "method": {k: v for k, v in method_config.items() if k != "detect"},
                            "training": asdict(scenario.training),
                            "seed": seed,
                        }
                    )
                    attacks = tuple(
                        AttackCell(
                            canonical_hash(
                                {
                                    "scenario": scenario.name,
                                    "train": train_id,
                                    "labels": [model.label, dataset.label, method.label, spec.label],
                                    "detect": {**method_config["detect"], **({"resync": True} if method.resync else {})},
                                    "attack": component_config(spec.attack),
                                    "strength": strength,
                                    "detection": asdict(scenario.detection),
                                }
                            ),
                            spec.label,
                            spec.attack,
                            strength,
                        )
                        for spec in scenario.attacks
                        for strength in spec.strengths
                    )
                    cells.append(TrainCell(train_id, seed, model, dataset, method, attacks))
    return cells
