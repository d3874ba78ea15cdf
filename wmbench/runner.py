"""Runs a scenario: plans the unfinished cells, hands them to an executor, stores each row."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from wmbench.cache import check_folders
from wmbench.devices import parse_device, resolve_device
from wmbench.errors import ConfigError, Incompatible
from wmbench.executors import Executor, LocalExecutor
from wmbench.grid import AttackCell, TrainCell, expand, stored_trainings
from wmbench.results import REFERENCE_METHOD, ResultStore, join_unwatermarked, judge, to_frame
from wmbench.scenario import Scenario
from wmbench.worker import CellWorker

log = logging.getLogger(__name__)
__all__ = ["Plan", "Runner", "resolve_device"]


@dataclass(frozen=True)
class Plan:
    """What a run has left to do: each training cell with its unfinished attack cells."""

    cells: list[TrainCell]
    todo: list[tuple[TrainCell, list[AttackCell]]]
    trainings: int  # as ``grid.stored_trainings`` counts them
    trainings_cached: int
    trainings_stopped: frozenset[str] = frozenset()  # train ids with epoch checkpoints: they continue
    trainings_stored: frozenset[str] = frozenset()  # train ids all of whose trainings the cache holds

    @property
    def total(self) -> int:
        return sum(len(c.attacks) for c in self.cells)

    @property
    def pending(self) -> int:
        return sum(len(attacks) for _, attacks in self.todo)

    def describe(self) -> str:
        """The grid in a few lines, for ``wmbench run --dry-run``."""
        trainings = self.trainings
        lines = [
            f"cells: {self.total} ({self.total - self.pending} done, {self.pending} to run)",
            f"trainings: {trainings} ({self.trainings_cached} cached, {trainings - self.trainings_cached} to do; "
            "method entries differing only in detection options share one)",
        ]
        for cell, attacks in self.todo:
            stopped = " (its stopped training continues from an epoch checkpoint)" if cell.train_id in self.trainings_stopped else ""
            lines.append(f"  {cell.model.label} / {cell.dataset.label} / {cell.method.label} / seed {cell.seed}: "
                         f"{len(attacks)} cell{'s' if len(attacks) != 1 else ''} to run{stopped}")
        return "\n".join(lines)


def default_store(cache_dir: Path, name: str) -> Path:
    """Where a scenario's finished cells are kept unless ``--store`` says otherwise."""
    return cache_dir / "results" / f"{name}.jsonl"


class Runner:
    """Executes a scenario's grid against a training cache and a results store."""

    def __init__(self, scenario: Scenario, cache_dir: Path, device: str | None = None, progress: bool = True, store: Path | None = None) -> None:
        self.scenario = scenario
        self.device_name = device or scenario.device
        if self.device_name != "auto":
            parse_device(self.device_name)  # a typo fails now; availability is checked where cells run
        self.cache_dir = cache_dir
        check_folders(cache_dir)  # before its results store is read
        self.store = ResultStore(store) if store is not None else ResultStore(default_store(cache_dir, scenario.name), in_cache=True)
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return resolve_device(self.device_name)

    @functools.cached_property
    def _inspector(self) -> CellWorker:
        """A CPU worker for looking before the run (the plan's digests and cache, the pre-flight's
        models and keys): each dataset it reads is read once for both."""
        return CellWorker(self.scenario, self.cache_dir, "cpu", progress=False)

    def check(self) -> None:
        """Fail now, naming the field (``datasets[0].args.root``), when a dataset's files are missing."""
        from wmbench.blame import blame

        for dataset in self.scenario.datasets:
            try:
                dataset.obj.check(self.cache_dir)
            except ConfigError as exc:
                raise blame(exc, self.scenario, "datasets", dataset) from None

    def preflight(self, plan: Plan, download: bool = True) -> tuple[list[str], list[str]]:
        """Before any training, each (model, dataset, method) with a training to do is built and
        keyed once (``CellWorker.check_keygen``): a mismatch in a one-pair scenario raises its
        ConfigError now (exit 2, nothing run); in a grid of several pairs the mismatched pairs are
        returned (their cells fail in the run, the rest of the grid goes on), with, second, the
        labels of datasets left unchecked because their data would be downloaded (``download``
        False: ``--dry-run`` downloads nothing)."""
        worker = self._inspector
        problems: list[str] = []
        unchecked: list[str] = []
        checked: set[tuple[str, str, str]] = set()
        for cell, _ in plan.todo:
            which = (cell.model.label, cell.dataset.label, cell.method.label)
            if which in checked or cell.train_id in plan.trainings_stored or cell.dataset.label in unchecked:  # a copy whose twin is stored: its own to do
                continue
            if not download and cell.dataset.obj.needs_download(self.cache_dir):
                unchecked.append(cell.dataset.label)
                continue
            checked.add(which)
            try:
                worker.check_keygen(cell)
            except Incompatible as exc:
                if str(exc) not in problems:  # a model that cannot take the data: once, not per method
                    problems.append(str(exc))
        return problems, unchecked

    def plan(self) -> Plan:
        cells = expand(self.scenario)
        rows = self.store.rows(self.identities(cells))
        stale = self._measured_on_other_data(cells, rows)
        done = {cell_id for cell_id, row in rows.items() if not row.get("failure") and cell_id not in stale}  # failed: retried
        todo = [(c, [a for a in c.attacks if a.cell_id not in done]) for c in cells]
        worker = self._inspector
        trainings, cached, stored = stored_trainings(cells, worker.cache)
        stopped = frozenset(t for t in {c.train_id for c in cells} - stored if worker.cache.checkpoints_dir(t).is_dir())
        return Plan(cells, [(c, attacks) for c, attacks in todo if attacks], trainings, cached, stopped, stored)

    def run(self, executor: Executor | None = None, plan: Plan | None = None) -> pd.DataFrame:
        """Run every unfinished cell (``plan``: ``self.plan()``, computed here when not given);
        return all rows of the grid."""
        plan = plan or self.plan()
        log.info("%s: %d cells, %d to run", self.scenario.name, plan.total, plan.pending)
        executor = executor or LocalExecutor()
        # Local work resolves the device here; a distributed executor resolves it on each worker.
        device = self.device if isinstance(executor, LocalExecutor) else self.device_name
        worker = CellWorker(self.scenario, self.cache_dir, device, self.progress)
        with tqdm(total=plan.total, initial=plan.total - plan.pending, desc=self.scenario.name, unit="cell", disable=not self.progress) as bar:
            for cell_id, row in executor.run(worker, plan.todo):
                self.store.append(cell_id, row)
                bar.update(1)
        return self.collect(plan.cells)

    def _measured_on_other_data(self, cells: list[TrainCell], rows: dict[str, dict[str, Any]]) -> set[str]:
        """Cell ids whose stored row records other contents of its dataset (``data_digest``) than
        the copy read now, e.g. an edited ImageFolder: they run again. A dataset whose rows record
        no digest (embedded data) is not read."""
        cell_of = {a.cell_id: c for c in cells for a in c.attacks}
        by_dataset: dict[str, list[str]] = {}
        for cell_id, row in rows.items():
            if row.get("data_digest") and cell_id in cell_of:
                by_dataset.setdefault(cell_of[cell_id].dataset.label, []).append(cell_id)
        worker = self._inspector
        stale: set[str] = set()
        for label, ids in by_dataset.items():
            digest = worker.data(cell_of[ids[0]]).digest
            changed = {i for i in ids if digest and rows[i]["data_digest"] != digest}
            if changed:
                log.warning("%s: %d stored rows were measured on other %s data than the copy read now; they run again", self.store.path, len(changed), label)
            stale |= changed
        return stale

    def identities(self, cells: list[TrainCell]) -> dict[str, dict[str, Any]]:
        """cell_id -> the identity columns its row must carry."""
        return {
            a.cell_id: {
                "scenario": self.scenario.name, "model": c.model.label, "dataset": c.dataset.label,
                "method": c.method.label, "seed": c.seed, "attack": a.label, "strength": a.strength,
            }
            for c in cells for a in c.attacks
        }

    def collect(self, cells: list[TrainCell]) -> pd.DataFrame:
        """The grid's rows in grid order, with ``error_unwatermarked`` joined from `none` rows and
        ``detected`` judged at the scenario's threshold (p-value below it) whatever the threshold
        the row was measured under."""
        stored = self.store.rows(self.identities(cells))
        rows = [stored[a.cell_id] for c in cells for a in c.attacks if a.cell_id in stored]
        judge(rows, self.scenario.detection.threshold)
        join_unwatermarked(rows, {c.method.label for c in cells if c.method.obj.name == REFERENCE_METHOD})
        return to_frame(rows)



def failure_summary(frame: pd.DataFrame, limit: int = 10) -> str | None:
    """A few lines naming the failed cells of ``frame`` (rows with a ``failure``), cells that failed
    for the same reason in the same training grouped; None when every cell ran."""
    failed = frame[frame["failure"].notna()]
    if failed.empty:
        return None
    lines = [f"{len(failed)} of {len(frame)} cells failed (rerun the same command to retry only them):"]
    groups = failed.groupby(["model", "dataset", "method", "seed", "failure"], sort=False, dropna=False)
    for i, ((model, dataset, method, seed, failure), rows) in enumerate(groups):
        if i == limit:
            lines.append(f"  ... and {groups.ngroups - limit} more (see the failure column of the CSV)")
            break
        which = ", ".join(f"{a} {s:g}" for a, s in zip(rows["attack"], rows["strength"]))
        if len(rows) > 3:
            which = f"{len(rows)} cells"
        lines.append(f"  {model}/{dataset}/{method}/seed {seed} ({which}): {failure}")
    return "\n".join(lines)
