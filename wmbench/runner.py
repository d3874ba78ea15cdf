"""Runs a scenario: trains each cell once (cached), attacks copies, evaluates, appends rows."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from tqdm.auto import tqdm

import wmbench
from wmbench.api import AttackContext, Key, Method
from wmbench.cache import TrainCache
from wmbench.data import DataBundle
from wmbench.errors import NotApplicable, WmbenchError
from wmbench.grid import AttackCell, TrainCell, expand
from wmbench.metrics import accuracy, error_from_metric
from wmbench.results import ResultStore, to_frame
from wmbench.scenario import Scenario
from wmbench.train import Trainer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WmbenchError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WmbenchError("device cuda requested but no CUDA GPU is available (use --device cpu)")
    return device


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts of a cell's identity (independent of execution order)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs (CPU, and ``device`` if CUDA) for the block, then restore them."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class Runner:
    """Executes a scenario's grid against a training cache and a results store."""

    def __init__(self, scenario: Scenario, cache_dir: Path, device: str | None = None, progress: bool = True) -> None:
        self.scenario = scenario
        self.device = resolve_device(device or scenario.device)
        self.cache = TrainCache(cache_dir)
        self.store = ResultStore(cache_dir / "results" / f"{scenario.name}.jsonl")
        self.progress = progress
        self._data: dict[str, DataBundle] = {}

    def run(self) -> pd.DataFrame:
        """Run every unfinished cell; return all rows of the grid."""
        cells = expand(self.scenario)
        pending = {a.cell_id for c in cells for a in c.attacks} - self.store.rows().keys()
        total = sum(len(c.attacks) for c in cells)
        log.info("%s: %d cells, %d to run", self.scenario.name, total, len(pending))
        with tqdm(total=total, initial=total - len(pending), desc=self.scenario.name, unit="cell", disable=not self.progress) as bar:
            for cell in cells:
                if not any(a.cell_id in pending for a in cell.attacks):
                    continue
                model, key, meta = self.trained(cell)
                for attack_cell in cell.attacks:
                    if attack_cell.cell_id in pending:
                        row = self.attack_and_evaluate(cell, attack_cell, model, key, meta)
                        self.store.append(attack_cell.cell_id, row)
                        bar.update(1)
        return self.collect(cells)

    def data(self, cell: TrainCell) -> DataBundle:
        if cell.dataset.label not in self._data:
            self._data[cell.dataset.label] = cell.dataset.obj.load(self.cache.root)
        return self._data[cell.dataset.label]

    def trained(self, cell: TrainCell) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """The cell's trained model and key, from the cache or trained now and stored."""
        data = self.data(cell)
        with seeded(cell.seed, torch.device("cpu")):
            model = cell.model.obj.build(data)
        entry = self.cache.get(cell.train_id)
        if entry is not None:
            model, key = self.cache.load(entry, model)
            return model.to(self.device).eval(), key, entry.meta
        desc = f"train {cell.model.label}/{cell.dataset.label}/{cell.method.label}/seed{cell.seed}"
        trainer = Trainer(data, self.scenario.training, self.device, torch.Generator().manual_seed(cell.seed), desc, self.progress)
        with seeded(cell.seed, self.device):
            key = cell.method.obj.embed(model, trainer, torch.Generator().manual_seed(cell.seed + 1))
        metric_value = accuracy(model, data, self.device)
        meta = {
            "metric_value": metric_value,
            "train_s_per_epoch": trainer.seconds_per_epoch,
            "method": cell.method.obj.name,
            "wmbench_version": wmbench.__version__,
        }
        entry = self.cache.put(cell.train_id, model, key, meta)
        return model.eval(), key, entry.meta

    def attack_and_evaluate(self, cell: TrainCell, attack_cell: AttackCell, model: torch.nn.Module, key: Key, meta: dict[str, Any]) -> dict[str, Any]:
        """One result row: attack a copy of ``model``, measure the task metric and detection."""
        data = self.data(cell)
        seed = derived_seed(cell.seed, attack_cell.label, attack_cell.strength)
        ctx = AttackContext(data, torch.Generator().manual_seed(seed), self.device, cell.method.obj, key, self.progress)
        start = time.perf_counter()
        with seeded(seed, self.device):
            attacked = attack_cell.attack.apply(model, attack_cell.strength, ctx).to(self.device).eval()
        attack_s = time.perf_counter() - start
        start = time.perf_counter()
        metric_value = accuracy(attacked, data, self.device)
        stat, pvalue, detected, note = detect(cell.method.obj, attacked, key, self.scenario.detection.threshold)
        eval_s = time.perf_counter() - start
        error, error_clean = error_from_metric(metric_value), error_from_metric(meta["metric_value"])
        return {
            "scenario": self.scenario.name,
            "model": cell.model.label,
            "dataset": cell.dataset.label,
            "method": cell.method.label,
            "seed": cell.seed,
            "attack": attack_cell.label,
            "strength": attack_cell.strength,
            "metric": "accuracy",
            "metric_value": metric_value,
            "error": error,
            "error_clean": error_clean,
            "error_delta": error - error_clean,
            "detect_stat": stat,
            "detect_pvalue": pvalue,
            "detected": detected,
            "train_s_per_epoch": meta.get("train_s_per_epoch"),
            "attack_s": attack_s,
            "eval_s": eval_s,
            "wmbench_version": wmbench.__version__,
            "attack_effect": ctx.effect,
            "detect_note": ctx.notes.get("detect_note") or note,
        }

    def collect(self, cells: list[TrainCell]) -> pd.DataFrame:
        """The grid's rows in grid order, with ``error_unwatermarked`` joined from `none` rows."""
        stored = self.store.rows()
        rows = [stored[a.cell_id] for c in cells for a in c.attacks if a.cell_id in stored]
        clean_none = {
            (r["model"], r["dataset"], r["seed"]): r["error_clean"]
            for c in cells
            if c.method.obj.name == "none"
            for r in rows
            if r["method"] == c.method.label
        }
        for row in rows:
            row["error_unwatermarked"] = clean_none.get((row["model"], row["dataset"], row["seed"]))
        return to_frame(rows)


def detect(method: Method, model: torch.nn.Module, key: Key, threshold: float) -> tuple[float | None, float | None, bool | None, str | None]:
    """(stat, p-value, detected, note); a model that no longer fits the key gives a note instead."""
    try:
        result = method.detect(model, key)
    except NotApplicable as exc:
        return None, None, None, f"detection not applicable: {exc}"
    return result.stat, result.pvalue, result.detected(threshold), None
