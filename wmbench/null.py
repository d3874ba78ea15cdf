"""A calibrated null: each detector's false-positive rate measured on unwatermarked models.

For every method of a scenario, ``keys`` independent keys are drawn (the method's own ``keygen``,
on a scratch copy of an unwatermarked model, since substitutive methods write into the model
they get) and tested against the scenario's unwatermarked models (the `none` method's trainings,
one per seed, at least ``MIN_SEEDS``), clean and after each attack x strength. What the null
gives: the empirical false-positive rate at the scenario's threshold (k/n, Wilson interval), and
the operating points "1% / 0.1% empirical FPR" at which the watermarked rows of the scenario's
results store are scored (TPR = share of watermarked rows whose statistic exceeds the null's).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from wmbench.api import Key, Method
from wmbench.blame import blame_attack, incompatible
from wmbench.cache import load_weights
from wmbench.detection import detect
from wmbench.errors import ConfigError, DataEdited, Incompatible, NotApplicable, WmbenchError, machine_fault, stops_run
from wmbench.grid import TrainCell, expand, stored_trainings
from wmbench.model_checks import nonfinite_tensor
from wmbench.registry import METHODS
from wmbench.results import REFERENCE_METHOD
from wmbench.rows import failure_text
from wmbench.scenario import Component, Scenario
from wmbench.seeding import derived_seed, seeded
from wmbench.summary import MIN_SEEDS
from wmbench.worker import CellWorker

log = logging.getLogger(__name__)

CLEAN = "clean"
FPR_LEVELS = (0.01, 0.001)
MAX_KEYS = 10**8  # --keys: far beyond any calibration (1e-6 needs 1e6 draws over the seeds), below what breaks


@dataclass
class NullSample:
    """The null draws of one (model, dataset, method, attack, strength): statistics and p-values of
    unwatermarked models under independent keys; ``skipped`` counts NotApplicable detections,
    ``failed`` draws that could not be made (an attack or a detection that raised: a plug-in's bug,
    an invalid Detection), the first one's reason in ``failure``; ``nonfinite`` draws made on an
    attacked model holding NaN or infinite values (measured all the same, as the grid measures
    them), the first such tensor in ``nonfinite_in``."""

    stats: list[float] = field(default_factory=list)
    pvalues: list[float] = field(default_factory=list)
    skipped: int = 0
    failed: int = 0
    failure: str | None = None
    nonfinite: int = 0
    nonfinite_in: str | None = None


def null_scenario(scenario: Scenario) -> tuple[Scenario, str]:
    """The scenario reduced to its `none` method (added with defaults if absent) and at least
    ``MIN_SEEDS`` seeds; the `none` label. Training ids are those of the full grid."""
    nones = [m for m in scenario.methods if m.obj.name == REFERENCE_METHOD]
    none = nones[0] if nones else Component(REFERENCE_METHOD, METHODS.get(REFERENCE_METHOD)())
    seeds = list(scenario.seeds)
    while len(seeds) < MIN_SEEDS:
        seeds.append(max(seeds) + 1)
    return dataclasses.replace(scenario, methods=(none,), seeds=tuple(seeds)), none.label


def attack_cells(scenario: Scenario) -> list[tuple[str, Any, float]]:
    """(label, attack or None for clean, strength): the clean model, then every attack x strength
    but 0 (each attack's strength 0 is the clean model again)."""
    cells: list[tuple[str, Any, float]] = [(CLEAN, None, 0.0)]
    cells += [(spec.label, spec.attack, float(s)) for spec in scenario.attacks for s in spec.strengths if s != 0]
    return cells


@dataclass
class NullKeys:
    """The null keys of one method on one model: each drawn on ``model`` (its owner's model), with
    what keygen wrote into that model for it (``edits``: the tensors it changed; kept only when asked,
    for a resync method)."""

    model: nn.Module
    keys: list[Key]
    edits: list[dict[str, torch.Tensor]]

    def owner(self, i: int) -> nn.Module:
        """Key ``i``'s owner model: ``model`` as keygen left it (the reference a resync matches onto)."""
        owner = copy.deepcopy(self.model)
        load_weights(owner, {**self.model.state_dict(), **self.edits[i]})
        return owner.eval()


def draw_null_keys(method: Component[Method], model: nn.Module, data: Any, n: int, cell: TrainCell, progress: bool, owners: bool = False) -> NullKeys:
    """``n`` independent keys of ``method``, each drawn (and finalised) on a fresh copy of ``model``'s
    weights; ``model`` itself is never written. ``owners``: keep each key's edits (``NullKeys.owner``)."""
    scratch = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    drawn = NullKeys(model, [], [])
    desc = f"null keys {method.label}/seed{cell.seed}"
    seed = derived_seed("null", method.label, cell.model.label, cell.dataset.label, cell.seed)
    with seeded(seed, torch.device("cpu")):
        for i in tqdm(range(n), desc=desc, leave=False, disable=not progress):
            scratch.load_state_dict(state)
            key = method.obj.keygen(scratch, data, torch.Generator().manual_seed(derived_seed(seed, i)))
            drawn.keys.append(method.obj.finalize_key(scratch, key))
            if owners:
                drawn.edits.append({k: v.clone() for k, v in scratch.state_dict().items() if not torch.equal(v, state[k])})
    return drawn


def null_keys_or_none(
    scenario: Scenario, method: Component[Method], model: nn.Module, data: Any, n: int, cell: TrainCell, progress: bool, owners: bool = False,
) -> NullKeys | None:
    """``draw_null_keys``, or None (logged) when the method cannot key this model (``Incompatible``:
    deepsigns without a Linear classifier) in a grid where it keys others."""
    try:
        return draw_null_keys(method, model, data, n, cell, progress, owners)
    except ConfigError as exc:
        error = incompatible(exc, scenario, "methods", method)
        log.warning("null: %s skipped on %s/%s: %s", method.label, cell.model.label, cell.dataset.label, error)
        return None


@dataclass
class AttackedModel:
    """The model the null detects on for ``label`` at ``strength``: the clean model or an attacked
    copy; ``model`` None when the attack failed (``failure`` says why, as a failed row of the grid
    says it); ``nonfinite``: the first of its tensors holding NaN or infinite values, if any."""

    label: str
    strength: float
    model: nn.Module | None
    failure: str | None = None
    nonfinite: str | None = None


def attacked_models(worker: CellWorker, cell: TrainCell, model: nn.Module, cells: list[tuple[str, Any, float]], method: Method | None, key: Key | None) -> Iterator[AttackedModel]:
    """An ``AttackedModel`` for each of ``cells`` (attack None: the model itself), each attacked
    model made by the grid's own ``CellWorker.attacked`` (seeded as the grid seeds the same cell, so
    key-unaware attacks reproduce the grid's attacked `none` models; cast back to the trained
    precision), and the shared data checked once its detections are done, as a cell checks it. As
    in the grid, an attack's ConfigError names its ``attacks[i]`` entry and stops the null, as does
    a machine fault (``stops_run``) or an edit of the shared data; any other failure fails only this
    attacked model's draws."""
    for label, attack, strength in cells:
        if attack is None:
            yield AttackedModel(label, strength, model)
            worker.check_data(cell, "a method's detector")
            continue
        try:
            attacked, _ = worker.attacked(cell, label, attack, strength, model, method, key, progress=False)
        except NotApplicable as exc:  # as in the grid: this attack does not apply to this model
            log.warning("null: %s %g skipped on %s: %s", label, strength, cell.model.label, exc)
            continue
        except ConfigError as exc:
            raise blame_attack(exc, worker.scenario, label) from None
        except Exception as exc:  # noqa: BLE001 - plug-in bugs included: as the grid, the null goes on
            if stops_run(exc) or isinstance(exc, DataEdited):
                raise
            failure = failure_text("attack", exc)
            log.warning("null: %s %g failed on %s/seed%d, its draws are counted as failed: %s", label, strength, cell.model.label, cell.seed, failure)
            yield AttackedModel(label, strength, None, failure=failure)
        else:
            yield AttackedModel(label, strength, attacked, nonfinite=nonfinite_tensor(attacked.state_dict()))
        worker.check_data(cell, f"attack {label!r} (or a method's detector)")


def uses_key(attack: Any) -> bool:
    """Whether an attack reads the secret key (``uses_key`` class attribute): it is then applied
    once per null key, with that key."""
    return bool(getattr(attack, "uses_key", False))


def uses_method(attack: Any) -> bool:
    """Whether an attack needs the attacked method but not its key (``uses_method``, e.g. an
    overwrite with the method's own embedding): it is then applied once per method."""
    return bool(getattr(attack, "uses_method", False)) and not uses_key(attack)


SampleKey = tuple[str, str, str, str, float]  # model, dataset, method label, attack label, strength


def announce_trainings(scenario: Scenario, reduced: Scenario, worker: CellWorker) -> None:
    """Say on stderr, before any work, how many unwatermarked models the null trains first (and
    which seeds it adds to the scenario's: it needs at least ``MIN_SEEDS``)."""
    trainings, cached, _ = stored_trainings(expand(reduced), worker.cache)  # as the run counts them
    if trainings == cached:
        return
    added = [s for s in reduced.seeds if s not in scenario.seeds]
    extra = f"; seeds {', '.join(map(str, added))} added: the null needs at least {MIN_SEEDS}" if added else ""
    print(f"null: {trainings - cached} unwatermarked training(s) to do first{extra}", file=sys.stderr)


def check_null_args(scenario: Scenario, keys: int) -> None:
    """What makes a null impossible, before any work: a key count out of range, or no watermarking
    method (only the unwatermarked reference)."""
    if not 1 <= keys <= MAX_KEYS:  # a count the progress bar and the arrays can hold (2^63 was a traceback)
        raise WmbenchError(f"--keys must be in [1, {MAX_KEYS:,}], got {keys}")
    if all(m.obj.name == REFERENCE_METHOD for m in scenario.methods):
        raise ConfigError("methods", "the null measures each watermarking method's detector on unwatermarked models; "
                          "this scenario lists none but the unwatermarked reference")


def run_null(scenario: Scenario, cache_dir: Path, device: torch.device | str, keys: int, progress: bool = True) -> dict[SampleKey, NullSample]:
    """Null draws for every (model, dataset, method label, attack label, strength) of the scenario;
    the unwatermarked models are trained through the normal worker when not cached."""
    check_null_args(scenario, keys)
    reduced, _ = null_scenario(scenario)
    methods = [m for m in scenario.methods if m.obj.name != REFERENCE_METHOD]
    cells = attack_cells(scenario)
    plain = [c for c in cells if not uses_key(c[1]) and not uses_method(c[1])]
    per_method = [c for c in cells if uses_method(c[1])]
    keyed = [c for c in cells if uses_key(c[1])]
    worker = CellWorker(reduced, cache_dir, device, progress)
    if progress:
        announce_trainings(scenario, reduced, worker)
    samples: dict[SampleKey, NullSample] = {}

    def record(cell: TrainCell, method: Component[Method], attacked: AttackedModel, drawn: NullKeys, i: int) -> None:
        sample = samples.setdefault((cell.model.label, cell.dataset.label, method.label, attacked.label, attacked.strength), NullSample())
        key = drawn.keys[i]
        if attacked.model is None:  # the attack failed: so does this draw
            sample.failed += 1
            sample.failure = sample.failure or attacked.failure
            return
        if attacked.nonfinite is not None:
            sample.nonfinite += 1
            sample.nonfinite_in = sample.nonfinite_in or attacked.nonfinite
        model = attacked.model
        try:
            # As the grid detects: through wmbench.detection.detect (the key's tensors found in a
            # wrapped model, a copy of the key), a resync method's suspect matched onto the key's
            # owner model first.
            reference, example = (drawn.owner(i), worker.data(cell).train_x[:2]) if method.resync else (None, None)
            stat, pvalue, *_ = detect(method.obj, model, copy.deepcopy(key), scenario.detection.threshold, reference, example)
            if stat is None:
                raise NotApplicable("the model no longer fits the key")
        except NotApplicable:
            sample.skipped += 1
            return
        except Exception as exc:  # noqa: BLE001 - one method's broken detector must not stop the others' null
            if machine_fault(exc):  # as in the grid: a full disk, a read-only cache stop it (exit 4)
                raise
            sample.failed += 1
            sample.failure = sample.failure or failure_text("detect", exc)  # as the grid's failed row says it
            return
        sample.stats.append(float(stat))
        sample.pvalues.append(float(pvalue))

    trained: list[tuple[TrainCell, nn.Module]] = []
    for cell in expand(reduced):
        try:
            trained.append((cell, worker.trained(cell)[0]))
        except Incompatible as exc:  # e.g. a model whose poolings need larger images than this dataset's
            log.warning("null: %s/%s skipped: %s", cell.model.label, cell.dataset.label, exc)
    for cell, model in trained:
        data = worker.data(cell)
        null_keys = {}
        for m in methods:
            # A resync method's keys are drawn on another seed's unwatermarked model, their owner, onto
            # which the suspect is matched: an innocent model is never matched onto its own weights.
            owner = other_seed(cell, trained) if m.resync else model
            drawn = null_keys_or_none(scenario, m, owner, data, keys, cell, progress, owners=m.resync)
            worker.check_data(cell, f"method {m.label!r}", contents=True)  # its keygen, as after a cell's
            if drawn is not None:
                null_keys[m.label] = drawn
        applicable = [m for m in methods if m.label in null_keys]
        attacked_plain = attacked_models(worker, cell, model, plain, None, None)
        desc = f"null attacks {cell.model.label}/seed{cell.seed}"
        for attacked in tqdm(attacked_plain, total=len(plain), desc=desc, leave=False, disable=not progress):
            for m in applicable:
                for i in range(keys):
                    record(cell, m, attacked, null_keys[m.label], i)
        for m in applicable:
            for attacked in attacked_models(worker, cell, model, per_method, m.obj, None):
                for i in range(keys):
                    record(cell, m, attacked, null_keys[m.label], i)
        for m in applicable if keyed else []:
            for i in tqdm(range(keys), desc=f"null key-aware {m.label}", leave=False, disable=not progress):
                for attacked in attacked_models(worker, cell, model, keyed, m.obj, null_keys[m.label].keys[i]):
                    record(cell, m, attacked, null_keys[m.label], i)
    return samples


def other_seed(cell: TrainCell, trained: list[tuple[TrainCell, nn.Module]]) -> nn.Module:
    """The unwatermarked model of the next seed (cyclically) of ``cell``'s model and dataset."""
    same = sorted(((c.seed, m) for c, m in trained if (c.model.label, c.dataset.label) == (cell.model.label, cell.dataset.label)), key=lambda sm: sm[0])
    seeds = [seed for seed, _ in same]
    return same[(seeds.index(cell.seed) + 1) % len(same)][1]


def null_cutoff(stats: list[float], fpr: float) -> float | None:
    """The statistic above which at most ``fpr`` of the null draws lie (detected: stat > cutoff);
    None when the draws are too few to resolve ``fpr`` (fewer than 1 / fpr)."""
    n = len(stats)
    if n == 0 or n * fpr < 1 - 1e-9:
        return None
    ordered = sorted(stats, reverse=True)
    return ordered[int(math.floor(n * fpr + 1e-9))]


# Above this Spearman correlation between a method's statistics and their p-values (null draws and
# watermarked rows together), the statistic falls as the evidence grows: a detector obeying the
# contract (larger: more likely watermarked) gives a correlation near -1.
REVERSED_RHO = 0.5


def statistic_falls_with_evidence(pairs: list[tuple[float, float]]) -> bool:
    """Whether, over these (statistic, p-value) pairs, a larger statistic goes with a larger p-value
    (Spearman correlation above ``REVERSED_RHO``): a bit-error rate, say, where the contract asks
    for a statistic that grows with the evidence. ``null_cutoff`` would then cut the wrong tail."""
    from scipy.stats import spearmanr

    finite = [(s, p) for s, p in pairs if math.isfinite(s) and math.isfinite(p)]
    if len(finite) < 3 or len({s for s, _ in finite}) < 2 or len({p for _, p in finite}) < 2:
        return False
    rho = spearmanr([s for s, _ in finite], [p for _, p in finite]).statistic
    return bool(math.isfinite(rho) and rho > REVERSED_RHO)


def true_positive_rate(watermarked: list[float | None], cutoff: float | None) -> float | None:
    """Share of watermarked statistics above ``cutoff`` (a missing statistic counts as a miss)."""
    if cutoff is None or not watermarked:
        return None
    return sum(1 for s in watermarked if s is not None and not math.isnan(s) and s > cutoff) / len(watermarked)
