"""The Ray executor: each training cell is a Ray task, each attack cell a Ray task that depends on
its training; rows flow back to the driver, which alone writes the results store.

Workers exchange trained models through the training cache, so the cache directory (and any
plug-in files) must be on a filesystem every node mounts at the same path. A task uses as many
torch threads as the CPUs it asked for (``resources.num_cpus``, at least 1): more would
oversubscribe the node's cores, and results depend on the thread count (torch's CPU kernels sum
in a thread-dependent order).
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

import torch

from wmbench.errors import ConfigError, WmbenchError
from wmbench.executors import Rows
from wmbench.grid import AttackCell, TrainCell
from wmbench.worker import CellWorker, failed_row

log = logging.getLogger(__name__)
_LIVE: dict[str, CellWorker] = {}  # in each Ray worker process: this run's worker, data loaded once


def _here(run_id: str, worker: CellWorker) -> CellWorker:
    """The run's worker in this process (the first shipped copy, holding its loaded data), with
    torch using the task's CPUs."""
    torch.set_num_threads(threads(worker.scenario.resources.num_cpus))
    if run_id not in _LIVE:
        _LIVE.clear()  # a new run: drop the previous run's data
        _LIVE[run_id] = worker
    return _LIVE[run_id]


def train_task(run_id: str, worker: CellWorker, train_id: str) -> dict[str, Any]:
    """Train one cell into the shared cache; returns its meta (small: the model stays on disk)."""
    return _here(run_id, worker).train(train_id)


def attack_task(run_id: str, worker: CellWorker, cell_id: str, trained: dict[str, Any]) -> dict[str, Any]:
    """One attack cell's row; ``trained`` (the training task's result) makes Ray run it after."""
    return _here(run_id, worker).attack(cell_id)


def threads(num_cpus: float) -> int:
    """The torch threads of a task given ``num_cpus`` CPUs."""
    return max(1, math.floor(num_cpus))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise WmbenchError("--executor ray needs Ray: pip install 'wmbench[ray]'") from None
    return ray


class RayExecutor:
    """Runs cells as Ray tasks on the cluster at ``address`` (default: the one ``ray.init()`` finds,
    ``$RAY_ADDRESS`` or a new local instance), with the scenario's ``resources`` per task."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def run(self, worker: CellWorker, todo: list[tuple[TrainCell, list[AttackCell]]]) -> Rows:
        ray = import_ray()
        resources = worker.scenario.resources
        if worker.device_name.startswith("cuda") and resources.num_gpus <= 0:
            raise WmbenchError(f"device {worker.device_name} under Ray needs resources.num_gpus > 0 in the scenario")
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise WmbenchError(f"cannot connect to Ray at {self.address or 'the default address'}: {exc}") from None
        try:
            yield from self._run(ray, worker, todo)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any, worker: CellWorker, todo: list[tuple[TrainCell, list[AttackCell]]]) -> Rows:
        resources = worker.scenario.resources
        options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
        train = ray.remote(train_task).options(**options)
        attack = ray.remote(attack_task).options(**options)
        run_id = uuid.uuid4().hex
        # Ray forwards a task's stderr line by line: one line per training epoch, no bars.
        shipped = ray.put(CellWorker(worker.scenario, worker.cache.root, worker.device_name, progress="lines" if worker.progress else False))
        trainings: dict[str, Any] = {}  # one task per train_id (detection variants share a training)
        pending: dict[Any, str] = {}
        for cell, attack_cells in todo:
            if cell.train_id not in trainings:
                trainings[cell.train_id] = train.remote(run_id, shipped, cell.train_id)
            for attack_cell in attack_cells:
                pending[attack.remote(run_id, shipped, attack_cell.cell_id, trainings[cell.train_id])] = attack_cell.cell_id
        log.info("ray: %d training tasks, %d attack tasks", len(trainings), len(pending))
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                cell_id = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    # The attack task catches its own failures: this is its training's (or a lost worker).
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, ConfigError):
                        raise cause from None  # the scenario is wrong: one line, as in a local run
                    cell, attack_cell = worker.lookup(cell_id)
                    assert attack_cell is not None
                    error = cause if isinstance(cause, BaseException) else exc
                    row = failed_row(worker.scenario.name, cell, attack_cell, "training", error)
                yield cell_id, row
        finally:
            for ref in pending:  # stopped early (error, interrupt): leave no work running
                ray.cancel(ref)
