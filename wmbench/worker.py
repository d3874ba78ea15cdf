"""Does the work of one training cell: train (or fetch from the cache), attack copies, evaluate."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import wmbench
from wmbench.api import Attack, AttackContext, Key, Method, Progress, apply_attack
from wmbench.cache import TrainCache, TrainedEntry, canonical_hash
from wmbench.checkpoint import EpochCheckpoints
from wmbench.data import DataBundle, load_seeded
from wmbench.devices import device_label, resolve_device
from wmbench.blame import addressed, blame_attack
from wmbench.carrier_change import reshaped_carriers_note, untouched_carriers_note
from wmbench.detection import detect, method_carriers, unwrapped
from wmbench.errors import NOT_APPLIED_NOTE, ConfigError, DataEdited, NotApplicable, WmbenchError, machine_fault, stops_run
from wmbench.grid import AttackCell, TrainCell, expand, key_args, training_key
from wmbench.key_record import owner_record, record_owner
from wmbench.machine_speed import process_machine_speed
from wmbench.model_checks import check_embedded, check_finite, check_runs, floating_dtypes, function_change, nonfinite_tensor, restore_precision, shared_parameter, state_digest, still_batchnorm
from wmbench.memory import PeakMemory
from wmbench.metrics import at_chance_note, error_from_metric, nonfinite_outputs, nonfinite_outputs_note, task_metric
from wmbench.rows import cell_labels, cell_name, failed_row
from wmbench.scenario import Component, Scenario, parse_scenario
from wmbench.seeding import derived_seed, seeded
from wmbench.train import Trainer
from wmbench.warn_once import Once

log = logging.getLogger(__name__)


class CellWorker:
    """Trains and attacks cells of one scenario; its only state is caches, so it can be shipped to
    another process (an executor's worker): it travels as the scenario's document, re-validated
    (plug-ins imported) on arrival, and a device name resolved there."""

    def __init__(self, scenario: Scenario, cache_dir: Path, device: torch.device | str, progress: Progress = True) -> None:
        self.scenario = scenario
        self.cache = TrainCache(cache_dir)
        self.device_name = str(device)
        self._device = device if isinstance(device, torch.device) else None
        self.progress = progress
        self._data: dict[str, DataBundle] = {}
        self._data_versions: dict[str, tuple[tuple[int, int], ...]] = {}
        self._data_fingerprints: dict[str, tuple[int, ...]] = {}  # read once per bundle (DataBundle.fingerprint)
        self._cells: dict[str, tuple[TrainCell, AttackCell | None]] | None = None
        self._last: tuple[tuple[str, str], tuple[torch.nn.Module, Key, dict[str, Any]]] | None = None
        self._clean: tuple[tuple[str, str], tuple[Any, ...]] | None = None  # ((training_key, method label), its clean evaluation)
        self._fresh: set[tuple[str, str]] = set()  # (model, dataset) labels whose two builds were found to share no parameter
        self._warned = Once()  # train_ids whose clean model was found at chance accuracy (warned once)

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
        """The training cell of a ``training_key``, or the (training, attack) cells of an attack cell_id."""
        if self._cells is None:
            self._cells = {}
            for cell in expand(self.scenario):
                self._cells.setdefault(training_key(cell), (cell, None))  # detection variants share a training
                self._cells.update({a.cell_id: (cell, a) for a in cell.attacks})
        if cell_id not in self._cells:
            raise WmbenchError(f"no cell {cell_id} in scenario {self.scenario.name}")
        return self._cells[cell_id]

    def train(self, key: str) -> dict[str, Any]:
        """Train the cell of a ``training_key`` into the cache (or find it there); its meta."""
        return self._trained_once(self.lookup(key)[0])[2]

    def attack(self, cell_id: str) -> dict[str, Any]:
        """The result row of one attack cell (its training fetched from the cache, or done now); a
        failed training or attack gives a row whose ``failure`` says why (ConfigError propagates)."""
        cell, attack_cell = self.lookup(cell_id)
        assert attack_cell is not None, f"{cell_id} is a training cell"
        try:
            model, key, meta = self._trained_once(cell)
        except Exception as exc:  # noqa: BLE001 - any failure of one cell (plug-in bugs included)
            if stops_run(exc):  # bad input (exit 2), a full disk or read-only cache (exit 4)
                raise
            return failed_row(self.scenario, cell, attack_cell, "training", exc)
        return self.attack_row(cell, attack_cell, model, key, meta)

    def _trained_once(self, cell: TrainCell) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """``trained`` with the last result kept (attacks run on copies, so it may be reused)."""
        which = (training_key(cell), canonical_hash(key_args(cell.method.obj)))  # one training, several key sizes
        if self._last is None or self._last[0] != which:
            self._last = (which, self.trained(cell))
        return self._last[1]

    def run_cell(self, cell: TrainCell, attack_cells: list[AttackCell]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(cell_id, row) for each of ``attack_cells``, training the cell first if not cached."""
        try:
            model, key, meta = self.trained(cell)
        except Exception as exc:  # noqa: BLE001 - a failed training fails its attack cells, not the grid
            if stops_run(exc):  # e.g. more carriers than weights, or a full disk
                raise
            for attack_cell in attack_cells:
                yield attack_cell.cell_id, failed_row(self.scenario, cell, attack_cell, "training", exc)
            return
        for attack_cell in attack_cells:
            yield attack_cell.cell_id, self.attack_row(cell, attack_cell, model, key, meta)

    def attack_row(self, cell: TrainCell, attack_cell: AttackCell, model: torch.nn.Module, key: Key, meta: dict[str, Any]) -> dict[str, Any]:
        """``attack_and_evaluate``, with any failure but a ConfigError recorded in the row."""
        try:
            return self.attack_and_evaluate(cell, attack_cell, model, key, meta)
        except ConfigError as exc:
            raise blame_attack(exc, self.scenario, attack_cell.label) from None
        except Exception as exc:  # noqa: BLE001 - plug-in bugs included: the grid goes on
            if machine_fault(exc):  # full disk, read-only cache: stop, exit 4
                raise
            return failed_row(self.scenario, cell, attack_cell, "attack", exc)

    def data(self, cell: TrainCell) -> DataBundle:
        if cell.dataset.label not in self._data:
            with self._blame("datasets", cell.dataset):
                data = load_seeded(cell.dataset.obj, self.cache.root)  # the same data in every process
            self._data[cell.dataset.label] = data
            self._data_versions[cell.dataset.label] = data.tensor_versions()
            self._data_fingerprints[cell.dataset.label] = data.fingerprint()
        return self._data[cell.dataset.label]

    def check_data(self, cell: TrainCell, who: str, contents: bool = False) -> None:
        """Raise DataEdited (and drop the bundle, so the next cell reads it again) when ``who``, a
        method or attack just run, edited the dataset every cell of the run shares: a tensor
        replaced or edited in place by torch (its version counter), or, with ``contents`` (after a
        method's keygen or training, where reading every byte costs little beside the work), any
        edit of its bytes, also one through ``.numpy()`` or ``.data``, which the counter misses."""
        label = cell.dataset.label
        if label not in self._data:
            return
        data = self._data[label]
        if data.tensor_versions() != self._data_versions[label] or contents and data.fingerprint() != self._data_fingerprints[label]:
            del self._data[label]
            raise DataEdited(
                f"{who} edited the shared {label} data in place (its tensors changed): later cells would have trained or "
                "been measured on the edited data. A method or attack must copy data before changing it (e.g. x = x.clone())"
            )

    @contextlib.contextmanager
    def _blame(self, section: str, component: Component[Any]) -> Iterator[None]:
        """A component's ConfigError while working (more carriers than weights, a missing dataset
        root), re-raised naming the scenario entry as load-time errors do: ``methods[1].args.rho``.
        A model's or a method's, in a grid of several model-dataset pairs, is about this pair only:
        ``Incompatible``, which fails the training's cells and lets the grid go on."""
        try:
            yield
        except ConfigError as exc:
            raise addressed(exc, self.scenario, section, component) from None

    def _built(self, cell: TrainCell, data: DataBundle) -> torch.nn.Module:
        """The cell's model, freshly initialised from its seed, checked to run on ``data`` and, on a
        model's first build in this worker, to share no parameter with another build's."""
        with seeded(cell.seed, torch.device("cpu")), self._blame("models", cell.model):
            model = self._build_once(cell, data)
            check_runs(model, data)
            if (cell.model.label, cell.dataset.label) not in self._fresh:
                shared = shared_parameter(model, self._build_once(cell, data))
                if shared:  # e.g. a layer made once at module level: every cell would train it further
                    raise ConfigError("models", f"build() returned a model sharing parameter {shared!r} with the model another build() call returned: "
                                      "training one cell would change the others' models. build() must make every layer and tensor anew (none made once, at module level)")
                self._fresh.add((cell.model.label, cell.dataset.label))
        return model

    def _build_once(self, cell: TrainCell, data: DataBundle) -> torch.nn.Module:
        try:
            model = cell.model.obj.build(data)
        except Exception as exc:  # noqa: BLE001 - a plug-in model's bug: addressed to its entry, not a traceback
            if stops_run(exc):
                raise
            raise ConfigError("models", f"building the model failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise ConfigError("models", f"build() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def check_keygen(self, cell: TrainCell) -> None:
        """Build the cell's model on its data and draw its method's key once, on the CPU, as the
        training would start: a scenario error (a ``layer`` the model lacks, more carriers than
        weights) raised now, addressed like the training's (ConfigError, or Incompatible in a grid of
        several pairs), instead of after the trainings before it. Any other exception is left for
        the run to record in the cell's row."""
        data = self.data(cell)
        model = self._built(cell, data)
        with seeded(cell.seed, torch.device("cpu")), self._blame("methods", cell.method):
            try:
                key = cell.method.obj.keygen(model, data, torch.Generator().manual_seed(cell.seed + 1))
            except ConfigError:
                raise
            except Exception:  # noqa: BLE001 - a plug-in's bug: its cells fail in the run, as before
                log.debug("pre-flight keygen of %s failed", cell.method.label, exc_info=True)
            else:
                if not isinstance(key, Key):
                    raise ConfigError("methods", f"{type(cell.method.obj).__name__}.keygen returned {type(key).__name__}, not a wmbench.api.Key (a missing `return key`?)")
                problem = key.problem()  # the key is written to the cache after the training: it would fail only then
                if problem:
                    raise ConfigError("methods", f"{type(cell.method.obj).__name__}.keygen's {problem}")
        with contextlib.suppress(DataEdited):  # the training's own check fails its cells; read the data again
            self.check_data(cell, f"method {cell.method.label!r}", contents=True)

    def trained(self, cell: TrainCell, key_seed: int | None = None, cache: bool = True) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """The cell's trained model and key, from the cache or trained now and stored.

        The key's generator is seeded with ``cell.seed + 1`` (the benchmark's reproducible keys)
        unless ``key_seed`` is given; such a training is cached under its own id (``cache``: read
        and write the cache at all; an owner's OS-random key is never left there). A clean model
        at chance accuracy is warned of (``warn_at_chance``)."""
        model, key, meta = self._fetched_or_trained(cell, key_seed, cache)
        self.warn_at_chance(cell, model, meta)
        return model, key, meta

    def warn_at_chance(self, cell: TrainCell, model: torch.nn.Module, meta: dict[str, Any]) -> None:
        """Log a warning, once per training in this worker, when the cell's clean model is at chance
        accuracy (``wmbench.metrics.at_chance``), saying where its BatchNorm statistics moved little in
        the training's steps (``still_batchnorm``): each of its rows says so in ``detect_note``."""
        data = self.data(cell)
        note = at_chance_note(meta.get("metric_value", math.nan), data)
        if note is None or not self._warned.first(cell.train_id):
            return
        training = self.scenario.training
        hint = still_batchnorm(model, training.epochs * math.ceil(len(data.train_x) / training.batch_size))
        log.warning("%s: %s%s", cell_name(cell), note, f" ({hint})" if hint else "")

    def _fetched_or_trained(self, cell: TrainCell, key_seed: int | None, cache: bool) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """``trained``'s model, key and meta, without its warning."""
        try:  # an attack or detector checks only the version counters after it: an edit through .numpy() or .data shows here
            self.check_data(cell, "an attack or detector of an earlier cell", contents=True)
        except DataEdited as exc:
            log.warning("%s: read again for this training", exc)
        data = self.data(cell)
        model = self._built(cell, data)
        base_id = cell.train_id if key_seed is None else f"{cell.train_id}-key{key_seed}"
        if not cache:  # an owner's OS-random key: never read from or left in the cache
            return self._train(cell, data, model, key_seed)
        train_id, entry = self._cached(base_id, data, cell.method.obj.name)
        if entry is not None:
            return self._stored(cell, data, model, entry, key_seed)
        with self.cache.training_lock(base_id):
            train_id, entry = self._cached(base_id, data, cell.method.obj.name)  # trained meanwhile by another run sharing the cache
            if entry is not None:
                return self._stored(cell, data, model, entry, key_seed)
            checkpoints = self._checkpoints(cell, data, train_id)
            model, key, meta = self._train(cell, data, model, key_seed, checkpoints)
            entry = self.cache.put(train_id, model, key, meta)
            if checkpoints is not None:
                checkpoints.clear()
        try:  # read back as a resumed run will: a key or model that does not survive storage fails now, not then
            stored = self._stored(cell, data, self._built(cell, data), entry, key_seed)
            changed = function_change(model, stored[0], data.train_x[:4].to(self.device))
            if changed:  # e.g. a keygen that swapped a ReLU for a Tanh: every row would judge another model
                raise ValueError(f"the model read back from its checkpoint computes another function than the trained one ({changed}): "
                                 "a checkpoint holds parameters and buffers, so a method may change those, not the model's modules")
            return stored
        except Exception as exc:  # noqa: BLE001 - e.g. an embed that added a parameter the built model lacks
            if stops_run(exc):
                raise
            self.cache.discard(train_id)
            raise WmbenchError(f"the training of {cell.method.label!r} does not read back from the cache as it was stored ({type(exc).__name__}: {exc})") from exc

    def _cached(self, base_id: str, data: DataBundle, method: str) -> tuple[str, TrainedEntry | None]:
        """The id a training is stored under and its entry (None: to train). ``base_id`` names it,
        unless the entry there was trained on other contents of the dataset (ids leave out where the
        data lies, so an edited copy has the same ids) or an entry ``<base_id>-data<digest>`` holds
        this copy's: that one, so the edited copy trains once and each copy keeps its own training."""
        entry = self.cache.get(base_id, method)
        stored = entry.meta.get("data_digest") if entry is not None else None
        if not data.digest or (entry is not None and stored in (None, data.digest)):
            return base_id, entry
        train_id = f"{base_id}-data{data.digest[:16]}"
        own = self.cache.get(train_id, method)
        return (train_id, own) if own is not None or entry is not None else (base_id, None)

    def _checkpoints(self, cell: TrainCell, data: DataBundle, train_id: str) -> EpochCheckpoints | None:
        """Epoch checkpoints for a training of a method that can continue from them (else None)."""
        if not cell.method.obj.resumable:
            return None
        fingerprint = {
            "train_id": train_id, "data_digest": data.digest, "wmbench_version": wmbench.__version__,
            "torch_threads": torch.get_num_threads(), "device": device_label(self.device),
        }
        return EpochCheckpoints(self.cache.checkpoints_dir(train_id), fingerprint, self.device)

    def _stored(self, cell: TrainCell, data: DataBundle, model: torch.nn.Module, entry: TrainedEntry, key_seed: int | None) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """A cached training. For a method with ``key_only_args`` the training may have been done
        for other values of them: its key is drawn again, as the training draws it (same seeds,
        from the freshly built ``model``), and completed on the trained one."""
        fresh_key = None
        if cell.method.obj.key_only_args:
            with seeded(cell.seed, self.device), self._blame("methods", cell.method):
                fresh_key = cell.method.obj.keygen(copy.deepcopy(model), data, torch.Generator().manual_seed(cell.seed + 1 if key_seed is None else key_seed))
            self.check_data(cell, f"method {cell.method.label!r}", contents=True)
        model, key = self.cache.load(entry, model)
        model = model.to(self.device).eval()
        if fresh_key is not None:
            key = cell.method.obj.finalize_key(model, fresh_key)
            key.meta.update(owner_record(cell, data))
        elif "model" not in key.meta:  # stored by an older wmbench
            key.meta.update(owner_record(cell, data))
        return model, key, entry.meta

    def _train(
        self, cell: TrainCell, data: DataBundle, model: torch.nn.Module, key_seed: int | None, checkpoints: EpochCheckpoints | None = None,
    ) -> tuple[torch.nn.Module, Key, dict[str, Any]]:
        """Train ``model`` now (the key generator seeded with ``key_seed``, else ``cell.seed + 1``),
        continuing from ``checkpoints`` when they hold a stopped run of this training."""
        desc = f"train {cell.model.label}/{cell.dataset.label}/{cell.method.label}/seed{cell.seed}"
        speed = process_machine_speed(self.device)  # before training: the machine as the training found it
        trainer = Trainer(data, self.scenario.training, self.device, torch.Generator().manual_seed(cell.seed), desc, self.progress)
        trainer.checkpoints = checkpoints
        built, before = floating_dtypes(model), state_digest(model)
        with seeded(cell.seed, self.device), PeakMemory(self.device) as memory, self._blame("methods", cell.method), torch.enable_grad():
            key = cell.method.obj.embed(model, trainer, torch.Generator().manual_seed(cell.seed + 1 if key_seed is None else key_seed))
        self.check_data(cell, f"method {cell.method.label!r}", contents=True)
        check_embedded(before, model, cell.method.obj)
        # a method that trained in another precision (model.double()): the model is stored, read back
        # and measured at the built one, as every method's is; each row says so
        precision, evaluated = restore_precision(model, built)
        embed_note = f"{type(cell.method.obj).__name__}.embed returned {', '.join(p.removeprefix('torch.') for p in precision)} weights: stored and evaluated in {', '.join(evaluated)}" if precision else None
        record_owner(cell, data, key, model)
        check_finite(model, desc)
        _, metric_value = task_metric(model, data, self.device)
        meta = {
            "metric_value": metric_value,
            "train_s_per_epoch": trainer.seconds_per_epoch,
            "peak_mem_mb": memory.peak_mb,
            "method": cell.method.obj.name,
            "wmbench_version": wmbench.__version__,
            "torch_threads": torch.get_num_threads(),  # the training's; a row records its attack's
            "device": device_label(self.device),
            "data_digest": data.digest,  # a dataset read from files: its path is not in the ids
            "reference_images_per_s": speed,
        }
        if embed_note:
            meta["embed_note"] = embed_note
        return model.eval(), key, meta

    def attacked(
        self, cell: TrainCell, label: str, attack: Attack, strength: float, model: torch.nn.Module, method: Method | None, key: Key | None, progress: Progress | None = None,
    ) -> tuple[torch.nn.Module, AttackContext]:
        """The attacked copy of ``model`` and its context (effect, notes), made as every attacked
        model is, in a cell of the grid and in the null alike: the generators seeded from the cell's
        seed, ``label`` and ``strength`` (the context's ``attack_seed`` from the seed and the
        attack's name alone: every entry of one attack shares it); the attack given a copy of
        ``key`` (one that edits it must not change later detections) and ``method``; ``model`` left
        untouched (``apply_attack``: a copy for an attack overriding ``apply``, gradients on, a
        module returned), since it serves every attack of its training; the result on the device in
        eval mode, each tensor cast back to the trained model's dtype (a float16 copy is measured at the trained precision, and
        ``detect_note`` says so). NotApplicable propagates, after the shared data is checked."""
        seed = derived_seed(cell.seed, label, strength)
        ctx = AttackContext(self.data(cell), torch.Generator().manual_seed(seed), self.device, method, copy.deepcopy(key),
                            self.progress if progress is None else progress, training=self.scenario.training,
                            attack_seed=derived_seed(cell.seed, attack.name))
        try:
            with seeded(seed, self.device):
                attacked = apply_attack(attack, model, strength, ctx).to(self.device).eval()
        except NotApplicable:
            self.check_data(cell, f"attack {label!r}")
            raise
        precision, evaluated = restore_precision(attacked, model)
        if precision:  # e.g. a thief's float16 copy: its rounded weights, evaluated at the trained model's precision
            ctx.notes["detect_note"] = "; ".join(filter(None, [ctx.notes.get("detect_note"), f"the attack returned {', '.join(precision)} weights: evaluated in {', '.join(evaluated)}"]))
        return attacked, ctx

    def attack_and_evaluate(self, cell: TrainCell, attack_cell: AttackCell, model: torch.nn.Module, key: Key, meta: dict[str, Any]) -> dict[str, Any]:
        """One result row: attack a copy of ``model``, measure the task metric and detection."""
        data = self.data(cell)
        chance = at_chance_note(meta["metric_value"], data)  # every row of such a training says so
        start = time.perf_counter()
        try:
            attacked, ctx = self.attacked(cell, attack_cell.label, attack_cell.attack, attack_cell.strength, model, cell.method.obj, key)
        except NotApplicable as exc:  # e.g. torch-pruning cannot trace this architecture
            return {
                **cell_labels(self.scenario, cell, attack_cell),
                "error_clean": error_from_metric(meta["metric_value"]),
                "train_s_per_epoch": meta.get("train_s_per_epoch"),
                "attack_s": time.perf_counter() - start,
                "detect_note": "; ".join(filter(None, [f"{NOT_APPLIED_NOTE}: {exc}", meta.get("embed_note"), chance])),
                "peak_mem_mb": meta.get("peak_mem_mb"),
                "data_digest": meta.get("data_digest"),
                "reference_images_per_s": meta.get("reference_images_per_s"),
            }
        attack_s = time.perf_counter() - start
        start = time.perf_counter()
        untouched = attack_cell.strength == 0  # an untouched copy (apply_attack), for every attack
        if not untouched:  # a mark the attack never reached (a BatchNorm mark under noise): said, not left to read as robustness
            carriers = method_carriers(cell.method.obj, key)
            suspect = unwrapped(attacked, carriers)[0]  # the carriers' tensors, as detection reads them
            same = untouched_carriers_note(attack_cell.label, carriers, model, suspect)
            if same:
                ctx.notes["detect_note"] = "; ".join(filter(None, [ctx.notes.get("detect_note"), same]))
        clean_key = (training_key(cell), cell.method.label)  # detection-only variants share a training, not a detector
        if untouched and self._clean is not None and self._clean[0] == clean_key:
            evaluation = self._clean[1]  # every attack's strength 0 is the same clean model: evaluated once
        else:
            with nonfinite_outputs(attacked) as outputs:
                metric, metric_value = task_metric(attacked, data, self.device)
            reference = model if cell.method.resync else None
            try:
                detection = detect(cell.method.obj, attacked, copy.deepcopy(key), self.scenario.detection.threshold, reference, data.train_x[:2])
            except Exception as exc:  # noqa: BLE001 - the method's detector failed, not the attack
                if machine_fault(exc):
                    raise
                return failed_row(self.scenario, cell, attack_cell, "detect", exc)
            evaluation = (metric, metric_value, *detection, nonfinite_outputs_note(outputs, metric))
            if untouched:
                self._clean = (clean_key, evaluation)
        self.check_data(cell, f"attack {attack_cell.label!r} (or method {cell.method.label!r}'s detector)")
        metric, metric_value, stat, pvalue, log10_p, detected, note, outputs_note = evaluation
        if stat is not None and not untouched and not cell.method.resync:  # a figure read where the carriers no longer are
            note = "; ".join(filter(None, [note, reshaped_carriers_note(carriers, model, suspect)])) or None
        broken = None if untouched else nonfinite_tensor(attacked.state_dict())  # measured all the same, but said
        overflow = f"the attacked model holds non-finite values in {broken}" if broken else None
        eval_s = time.perf_counter() - start
        error, error_clean = error_from_metric(metric_value), error_from_metric(meta["metric_value"])
        return {
            **cell_labels(self.scenario, cell, attack_cell),
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
            "attack_effect": None if ctx.effect is None else float(ctx.effect),  # a plug-in may set a tensor
            "detect_note": "; ".join(str(n) for n in (overflow, outputs_note, ctx.notes.get("detect_note"), note, meta.get("embed_note"), chance) if n) or None,
            "peak_mem_mb": meta.get("peak_mem_mb"),
            "detect_log10_p": log10_p,
            "torch_threads": torch.get_num_threads(),
            "device": device_label(self.device),
            "data_digest": meta.get("data_digest"),
            "reference_images_per_s": meta.get("reference_images_per_s"),
        }


def _rebuild_worker(source: Any, path: Path | None, cache_dir: Path, device: str, progress: Progress) -> CellWorker:
    """A shipped CellWorker, arriving: re-validate the scenario (its plug-ins imported here)."""
    base = path.parent if path is not None else Path.cwd()
    return CellWorker(parse_scenario(source, base, path), cache_dir, device, progress)

