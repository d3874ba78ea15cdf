"""The identifying columns of a result row, and the row of a cell that could not run."""

from __future__ import annotations

import logging
from typing import Any

import wmbench
from wmbench.grid import AttackCell, TrainCell
from wmbench.scenario import Scenario

log = logging.getLogger(__name__)


def failed_row(scenario: Scenario, cell: TrainCell, attack_cell: AttackCell, stage: str, exc: BaseException) -> dict[str, Any]:
    """The row of a cell that could not run: its labels, and in ``failure`` the stage and the error
    on one line (the runner retries such cells on the next run)."""
    log.info("cell %s %g of %s failed in %s: %s", attack_cell.label, attack_cell.strength, cell_name(cell), stage, one_line_error(exc))
    return {**cell_labels(scenario, cell, attack_cell), "failure": failure_text(stage, exc)}


def one_line_error(exc: BaseException) -> str:
    """``Type: message`` of ``exc`` on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def failure_text(stage: str, exc: BaseException) -> str:
    """A failed row's ``failure``: the stage (training, attack, detect) and the error on one line,
    at most 500 characters of it."""
    return f"{stage}: {one_line_error(exc)[:500]}"


def cell_name(cell: TrainCell) -> str:
    return f"{cell.model.label}/{cell.dataset.label}/{cell.method.label}/seed {cell.seed}"


def cell_labels(scenario: Scenario, cell: TrainCell, attack_cell: AttackCell) -> dict[str, Any]:
    """The identifying columns of an attack cell's row, what its method's statistic is, and the
    training's epochs (a published CSV then says what its models were trained for); for the
    results store only (no CSV column), the method's registered name."""
    return {
        "scenario": scenario.name,
        "epochs": scenario.training.epochs,
        "model": cell.model.label,
        "dataset": cell.dataset.label,
        "method": cell.method.label,
        "method_name": cell.method.obj.name,  # the store's: `wmbench leaderboard` finds the reference `none` by it
        "seed": cell.seed,
        "attack": attack_cell.label,
        "strength": attack_cell.strength,
        "wmbench_version": wmbench.__version__,
        "statistic": cell.method.obj.statistic or None,
    }
