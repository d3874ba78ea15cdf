"""Executors: where a plan's cells run. The local one runs them here, in order; the Ray one
(wmbench.ray_executor, optional) spreads them over a Ray cluster."""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from wmbench.errors import WmbenchError
from wmbench.grid import AttackCell, TrainCell
from wmbench.worker import CellWorker

Rows = Iterator[tuple[str, dict[str, Any]]]
EXECUTORS = ["local", "ray"]


class Executor(Protocol):
    def run(self, worker: CellWorker, todo: list[tuple[TrainCell, list[AttackCell]]]) -> Rows:
        """Yield (cell_id, row) for every pending attack cell, as each completes."""
        ...


class LocalExecutor:
    """Runs each training cell and then its attack cells in this process, reusing the trained model."""

    def run(self, worker: CellWorker, todo: list[tuple[TrainCell, list[AttackCell]]]) -> Rows:
        for cell, attack_cells in todo:
            yield from worker.run_cell(cell, attack_cells)


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``); ``address`` is a Ray cluster's."""
    if name == "local":
        if address:
            raise WmbenchError("--address applies to --executor ray only")
        return LocalExecutor()
    if name == "ray":
        from wmbench.ray_executor import RayExecutor

        return RayExecutor(address)
    raise WmbenchError(f"unknown executor {name!r} (use one of: {', '.join(EXECUTORS)})")
