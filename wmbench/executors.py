"""Executors: where a plan's cells run. The local one runs them here, in order."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from wmbench.grid import AttackCell, TrainCell
from wmbench.worker import CellWorker

Rows = Iterator[tuple[str, dict[str, Any]]]


class Executor(Protocol):
    def run(self, worker: CellWorker, todo: list[tuple[TrainCell, list[AttackCell]]]) -> Rows:
        """Yield (cell_id, row) for every pending attack cell, as each completes."""
        ...


class LocalExecutor:
    """Runs each training cell and then its attack cells in this process, reusing the trained model."""

    def run(self, worker: CellWorker, todo: list[tuple[TrainCell, list[AttackCell]]]) -> Rows:
        for cell, attack_cells in todo:
            yield from worker.run_cell(cell, attack_cells)
