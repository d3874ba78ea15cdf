"""The Ray executor: each training cell is a Ray task, each attack cell a Ray task that depends on
its training; rows flow back to the driver, which alone writes the results store. Trainings are
submitted as slots free up, after the attack cells of finished ones, so rows arrive (and a stopped
run keeps them) training by training.

Workers exchange trained models through the training cache, so the cache directory (and any
plug-in files) must be on a filesystem every node mounts at the same path. A task uses as many
torch threads as the CPUs it asked for (``resources.num_cpus``, at least 1): more would
oversubscribe the node's cores, and results depend on the thread count (torch's CPU kernels sum
in a thread-dependent order).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from collections import OrderedDict
from typing import Any

import torch

from wmbench.errors import ConfigError, WmbenchError
from wmbench.executors import Rows
from wmbench.grid import AttackCell, TrainCell, training_key
from wmbench.rows import failed_row
from wmbench.worker import CellWorker

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


def train_task(run_id: str, worker: CellWorker, key: str) -> dict[str, Any]:
    """Train one cell (its ``training_key``) into the shared cache; returns its meta (small: the
    model stays on disk)."""
    return _here(run_id, worker).train(key)


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


def nothing_listens(address: str | None, seconds: float = 5.0) -> str | None:
    """Why nothing can answer at ``address`` (or ``$RAY_ADDRESS``) when it is a ``host:port``
    (``ray://`` or not): no TCP connection within ``seconds``; None when one opens or the address
    is not a host and port (``auto``, ``local``, none: Ray's to resolve). ``ray.init`` retries such
    an address for about 14 minutes before it gives up."""
    address = address or os.environ.get("RAY_ADDRESS")
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        return f"nothing listens on {host} port {port} ({exc.strerror or exc})"
    return None


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
            why = nothing_listens(self.address)
            if why:
                raise WmbenchError(f"cannot connect to Ray at {self.address or os.environ['RAY_ADDRESS']}: {why}")
            try:
                ray.init(address=self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise WmbenchError(f"cannot connect to Ray at {self.address or 'the default address'}: {exc}") from None
        try:
            fits_no_node(ray, resources.num_cpus, resources.num_gpus, private=started and self.address is None and not os.environ.get("RAY_ADDRESS"))
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
        queue = trainings_in_order(todo)
        slots = task_slots(ray.cluster_resources(), resources.num_cpus, resources.num_gpus)
        log.info("ray: %d training tasks, %d attack tasks, %d at once", len(queue), sum(len(c) for c in queue.values()), slots)
        training: dict[Any, list[AttackCell]] = {}  # running training task -> its attack cells
        pending: dict[Any, str] = {}  # submitted attack task -> its cell_id
        try:
            while queue or training or pending:
                # A training is submitted only into a slot that no submitted task waits for, so the
                # attack cells of a finished training run (and reach the store) before the next
                # training starts: a run stopped midway keeps its finished trainings' rows.
                while queue and len(training) + len(pending) < slots:
                    key, attack_cells = queue.popitem(last=False)
                    training[train.remote(run_id, shipped, key)] = attack_cells
                (ref,), _ = ray.wait([*training, *pending], num_returns=1)
                if ref in training:  # its attack tasks get its outcome: a failed training fails them
                    for attack_cell in training.pop(ref):
                        pending[attack.remote(run_id, shipped, attack_cell.cell_id, ref)] = attack_cell.cell_id
                    continue
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
                    row = failed_row(worker.scenario, cell, attack_cell, "training", error)
                yield cell_id, row
        finally:
            for ref in [*training, *pending]:  # stopped early (error, interrupt): leave no work running
                ray.cancel(ref)


def trainings_in_order(todo: list[tuple[TrainCell, list[AttackCell]]]) -> OrderedDict[str, list[AttackCell]]:
    """training_key -> its attack cells, in grid order; detection variants (resync) share a
    training, two copies of a dataset (entries differing only in ``root``) do not."""
    queue: OrderedDict[str, list[AttackCell]] = OrderedDict()
    for cell, attack_cells in todo:
        queue.setdefault(training_key(cell), []).extend(attack_cells)
    return queue


def fits_no_node(ray: Any, num_cpus: float, num_gpus: float, private: bool) -> None:
    """Refuse (``private``: a Ray instance this run started, which no autoscaler grows) or warn (a
    cluster, which may grow) when no node has the CPUs and GPUs one task asks for: Ray would wait
    for such a node forever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
    if any(n.get("CPU", 0) >= num_cpus and n.get("GPU", 0) >= num_gpus for n in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("CPU", 0), n.get("GPU", 0)), default={})
    message = (f"no Ray node has the resources one task asks for (num_cpus {num_cpus:g}, num_gpus {num_gpus:g}; "
               f"the largest node has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs)")
    if private:
        raise ConfigError("resources", message + ": lower the scenario's resources")
    log.warning("ray: %s: the run waits until the cluster adds such a node", message)


def task_slots(cluster: dict[str, float], num_cpus: float, num_gpus: float) -> int:
    """How many tasks of the scenario's resources the cluster runs at once (at least 1)."""
    limits = [cluster.get("CPU", 0) / num_cpus] if num_cpus > 0 else []
    if num_gpus > 0:
        limits.append(cluster.get("GPU", 0) / num_gpus)
    return max(1, int(min(limits) if limits else cluster.get("CPU", 1)))
