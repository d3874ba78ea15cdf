"""Does the work of one training cell: train (or fetch from the cache), attack copies, evaluate."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import wmbench
from wmbench.api import AttackContext, Key, Method
from wmbench.cache import TrainCache
from wmbench.data import DataBundle
from wmbench.errors import NotApplicable
from wmbench.grid import AttackCell, TrainCell
from wmbench.memory import PeakMemory
from wmbench.metrics import accuracy, error_from_metric
from wmbench.scenario import Scenario
from wmbench.train import Trainer


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts of a cell's identity (independent of execution order)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs (CPU, and ``device`` if CUDA) for the block, then restore them."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class CellWorker:
    """Trains and attacks cells of one scenario; its only state is caches, so it can be shipped to
    another process (an executor's worker) as it is."""

    def __init__(self, scenario: Scenario, cache_dir: Path, device: torch.device, progress: bool = True) -> None:
        self.scenario = scenario
        self.cache = TrainCache(cache_dir)
        self.device = device
        self.progress = progress
        self._data: dict[str, DataBundle] = {}

    def run_cell(self, cell: TrainCell, attack_cells: list[AttackCell]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(cell_id, row) for each of ``attack_cells``, training the cell first if not cached."""
        model, key, meta = self.trained(cell)
        for attack_cell in attack_cells:
            yield attack_cell.cell_id, self.attack_and_evaluate(cell, attack_cell, model, key, meta)

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
        with seeded(cell.seed, self.device), PeakMemory(self.device) as memory:
            key = cell.method.obj.embed(model, trainer, torch.Generator().manual_seed(cell.seed + 1))
        metric_value = accuracy(model, data, self.device)
        meta = {
            "metric_value": metric_value,
            "train_s_per_epoch": trainer.seconds_per_epoch,
            "peak_mem_mb": memory.peak_mb,
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
            "peak_mem_mb": meta.get("peak_mem_mb"),
        }


def detect(method: Method, model: torch.nn.Module, key: Key, threshold: float) -> tuple[float | None, float | None, bool | None, str | None]:
    """(stat, p-value, detected, note); a model that no longer fits the key gives a note instead."""
    try:
        result = method.detect(model, key)
    except NotApplicable as exc:
        return None, None, None, f"detection not applicable: {exc}"
    return result.stat, result.pvalue, result.detected(threshold), None
