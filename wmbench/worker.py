"""Does the work of one training cell: train (or fetch from the cache), attack copies, evaluate."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import wmbench
from wmbench.api import AttackContext, Key, Method, component_config
from wmbench.cache import TrainCache
from wmbench.data import DataBundle
from wmbench.errors import ConfigError, NotApplicable, TrainingDiverged, WmbenchError
from wmbench.grid import AttackCell, TrainCell, expand
from wmbench.memory import PeakMemory
from wmbench.metrics import error_from_metric, task_metric
from wmbench.scenario import Scenario, parse_scenario
from wmbench.train import Trainer


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WmbenchError("device cuda requested but no CUDA GPU is available (use --device cpu)")
    return device


def parse_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise WmbenchError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None


def check_finite(model: torch.nn.Module, desc: str) -> None:
    """TrainingDiverged when a weight or buffer of a trained model is NaN or infinite (never cached)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(f"{desc}: {name} holds non-finite values after training (learning rate or method strength too large?)")


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
    another process (an executor's worker): it travels as the scenario's document, re-validated
    (plug-ins imported) on arrival, and a device name resolved there."""

    def __init__(self, scenario: Scenario, cache_dir: Path, device: torch.device | str, progress: bool = True) -> None:
        self.scenario = scenario
        self.cache = TrainCache(cache_dir)
        self.device_name = str(device)
        self._device = device if isinstance(device, torch.device) else None
        self.progress = progress
        self._data: dict[str, DataBundle] = {}
        self._cells: dict[str, tuple[TrainCell, AttackCell | None]] | None = None
        self._last: tuple[str, tuple[torch.nn.Module, Key, dict[str, Any]]] | None = None

    @property
    def device(self) -> torch.device:
        """The device, resolved on first use (in the process that does the work)."""
        if self._device is None:
            self._device = resolve_device(self.device_name)
        return self._device

    def __reduce__(self) -> tuple[Any, ...]:
        s = self.scenario
        if s.source is None:  # built in code, not from a document: ship the objects themselves
            return (CellWorker, (s, self.cache.root, self.device_name, self.progress))
        return (_rebuild_worker, (s.source, s.path, self.cache.root, self.device_name, self.progress))

    def lookup(self, cell_id: str) -> tuple[TrainCell, AttackCell | None]:
        """The training cell of a train_id, or the (training, attack) cells of an attack cell_id."""
        if self._cells is None:
            self._cells = {}
            for cell in expand(self.scenario):
                self._cells.setdefault(cell.train_id, (cell, None))
                self._cells.update({a.cell_id: (cell, a) for a in cell.attacks})
        if cell_id not in self._cells:
            raise WmbenchError(f"no cell {cell_id} in scenario {self.scenario.name}")
        return self._cells[cell_id]

    def train(self, train_id: str) -> dict[str, Any]:
        """Train one cell into the cache (or find it there); its meta."""
        return self._trained_once(self.lookup(train_id)[0])[2]

    def attack(self, cell_id: str) -> dict[str, Any]:
        """The result row of one attack cell (its training fetched from the cache, or done now)."""
        cell, attack_cell = self.lookup(cell_id)
        assert attack_cell is not None, f"{cell_id} is a training cell"
        model, key, meta = self._trained_once(cell)
        return self.attack_and_evaluate(cell, attack_cell, model, key, meta)

    def _trained_once(self, cell: TrainCell) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """``trained`` with the last result kept (attacks run on copies, so it may be reused)."""
        if self._last is None or self._last[0] != cell.train_id:
            self._last = (cell.train_id, self.trained(cell))
        return self._last[1]

    def run_cell(self, cell: TrainCell, attack_cells: list[AttackCell]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(cell_id, row) for each of ``attack_cells``, training the cell first if not cached."""
        model, key, meta = self.trained(cell)
        for attack_cell in attack_cells:
            yield attack_cell.cell_id, self.attack_and_evaluate(cell, attack_cell, model, key, meta)

    def data(self, cell: TrainCell) -> DataBundle:
        if cell.dataset.label not in self._data:
            try:
                self._data[cell.dataset.label] = cell.dataset.obj.load(self.cache.root)
            except ConfigError as exc:
                raise exc.in_file(str(self.scenario.path)) if self.scenario.path and not exc.file else exc from None
        return self._data[cell.dataset.label]

    @contextlib.contextmanager
    def _blame(self, cell: TrainCell) -> Iterator[None]:
        """A method's ConfigError while training (e.g. more carriers than weights), re-raised
        naming the scenario entry, as load-time errors do."""
        try:
            yield
        except ConfigError as exc:
            index = [m.label for m in self.scenario.methods].index(cell.method.label)
            fields = {f.name for f in dataclasses.fields(cell.method.obj)}
            where = f"methods[{index}].args.{exc.field}" if exc.field in fields else f"methods[{index}]"
            raise ConfigError(where, exc.message, str(self.scenario.path) if self.scenario.path else None) from None

    def trained(self, cell: TrainCell) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """The cell's trained model and key, from the cache or trained now and stored."""
        data = self.data(cell)
        with seeded(cell.seed, torch.device("cpu")):
            model = cell.model.obj.build(data)
        entry = self.cache.get(cell.train_id)
        if entry is not None:
            model, key = self.cache.load(entry, model)
            if "model" not in key.meta:  # stored by an older wmbench
                key.meta.update(owner_record(cell, data))
            return model.to(self.device).eval(), key, entry.meta
        with self.cache.training_lock(cell.train_id):
            entry = self.cache.get(cell.train_id)  # trained meanwhile by another run sharing the cache
            if entry is not None:
                model, key = self.cache.load(entry, model)
                return model.to(self.device).eval(), key, entry.meta
            return self._train(cell, data, model)

    def _train(self, cell: TrainCell, data: DataBundle, model: torch.nn.Module) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        desc = f"train {cell.model.label}/{cell.dataset.label}/{cell.method.label}/seed{cell.seed}"
        trainer = Trainer(data, self.scenario.training, self.device, torch.Generator().manual_seed(cell.seed), desc, self.progress)
        with seeded(cell.seed, self.device), PeakMemory(self.device) as memory, self._blame(cell):
            key = cell.method.obj.embed(model, trainer, torch.Generator().manual_seed(cell.seed + 1))
        key.meta.update(owner_record(cell, data))
        check_finite(model, desc)
        _, metric_value = task_metric(model, data, self.device)
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
        metric, metric_value = task_metric(attacked, data, self.device)
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
            "metric": metric,
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


def _rebuild_worker(source: Any, path: Path | None, cache_dir: Path, device: str, progress: bool) -> CellWorker:
    """A shipped CellWorker, arriving: re-validate the scenario (its plug-ins imported here)."""
    base = path.parent if path is not None else Path.cwd()
    return CellWorker(parse_scenario(source, base, path), cache_dir, device, progress)


def owner_record(cell: TrainCell, data: DataBundle) -> dict[str, Any]:
    """What a key records of its model so ``wmbench detect`` can rebuild it: the architecture (a
    registry name and args), the data's shape, and the method's training args."""
    method = component_config(cell.method.obj)
    model = component_config(cell.model.obj)
    return {
        "model": {"name": model["name"], "version": model["version"], "args": model["args"]},
        "data": {
            "name": cell.dataset.obj.name,
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": list(data.image_size),
            "task": data.task,
        },
        "method": {"name": method["name"], "version": method["version"], "args": method["args"]},
    }


def detect(method: Method, model: torch.nn.Module, key: Key, threshold: float) -> tuple[float | None, float | None, bool | None, str | None]:
    """(stat, p-value, detected, note); a model that no longer fits the key gives a note instead."""
    try:
        result = method.detect(model, key)
    except NotApplicable as exc:
        return None, None, None, f"detection not applicable: {exc}"
    return result.stat, result.pvalue, result.detected(threshold), None
