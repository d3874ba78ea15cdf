"""A scenario's grid: training cells (model x dataset x method x seed), each with its attack cells.

A cell's identity is a hash of its canonical config and the versions of the components involved,
so changing a method invalidates exactly that method's cells. A plug-in component (one not shipped
in wmbench) also contributes a hash of its module's source, and of the sources of the modules
beside a .py plug-in that it imports: editing a plug-in or one of its helpers re-trains (or
re-attacks) its cells without a ``version`` bump, a chain's plug-in elements included. A mark image
the scenario names (``image:``) contributes a hash of its bytes: editing it trains again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from wmbench.api import Attack, Method, component_config, field_default, overrides_apply
from wmbench.cache import TrainCache, canonical_hash
from wmbench.data import Dataset
from wmbench.errors import ConfigError, WmbenchError
from wmbench.models import Model
from wmbench.plugin_imports import local_modules
from wmbench.scenario import Component, Scenario
from wmbench.train import TrainingConfig

# Bump when the meaning of a stored training changes (trainer, checkpoint layout).
TRAIN_FORMAT = 1

# The detection block as attack cell ids have always held it. A row's ``detected`` is derived from
# its stored p-value and the scenario's threshold when the grid is collected (Runner.collect), so
# the threshold stays out of the id: changing it re-runs nothing, and stores keep their ids.
ID_DETECTION = {"threshold": 1e-6}


# The training fields of TRAIN_FORMAT 1; any later field enters the hash only when it is not at its
# default (which trains as before), so the cached trainings of older scenarios keep their ids.
FORMAT1_TRAINING_FIELDS = frozenset({"epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones", "gamma"})


def training_identity(training: TrainingConfig) -> dict[str, Any]:
    """The ``training:`` block as it enters a training's id."""
    out = asdict(training)
    for f in dataclasses.fields(training):
        if f.name not in FORMAT1_TRAINING_FIELDS and out[f.name] == f.default:
            del out[f.name]
    return out


@dataclass(frozen=True)
class AttackCell:
    cell_id: str
    label: str
    attack: Attack
    strength: float


@dataclass(frozen=True)
class TrainCell:
    train_id: str
    seed: int
    model: Component[Model]
    dataset: Component[Dataset]
    method: Component[Method]
    attacks: tuple[AttackCell, ...]


def training_key(cell: TrainCell) -> str:
    """What names a training within a run (the caches a process holds, the Ray executor's training
    tasks): its train_id, which leaves out where the data lies (two entries of one dataset differing
    only in ``root`` share it, and each trains its own under ``<id>-data<digest>``), with the label
    of its dataset entry, which tells such copies apart. The train_id itself, which results stores
    record, is unchanged."""
    return f"{cell.train_id}@{cell.dataset.label}"


def stored_trainings(cells: Iterable[TrainCell], cache: TrainCache) -> tuple[int, int, frozenset[str]]:
    """The trainings of ``cells``, how many of them the cache holds, and the train ids all of whose
    trainings it holds; without decoding any data. A training is a train_id on one dataset entry's
    data: entries differing only in their label share it (``worker.CellWorker._cached`` serves the
    stored one), copies differing in where the data lies (``root``) share a train_id and each stores its
    own under ``<id>-data<digest>`` when its data differs, so of n copies sharing an id as many
    count as stored as the cache holds entries of that id, at most n (which copy an entry belongs
    to would take the data's digest: two roots holding the same files share one entry, and the
    second stays counted as to do). An edited copy, whose old training is still stored, is counted
    as stored."""
    copies = Counter({(c.train_id, repr(c.dataset.obj)): c.train_id for c in cells}.values())  # the entry's fields, root included
    stored = {train_id: min(n, cache.stored_copies(train_id)) for train_id, n in copies.items()}
    return sum(copies.values()), sum(stored.values()), frozenset(t for t, n in copies.items() if stored[t] == n)


BUILTIN_PREFIX = "wmbench."


def identity(obj: Any) -> dict[str, Any]:
    """What a component contributes to a cell's id: its config (name, version, args), plus what
    ``content_identity`` adds (the code of a plug-in, the bytes of a user's mark image, those of a
    chain's elements)."""
    return {**component_config(obj), **content_identity(obj)}


# Fields that name a user's file whose bytes the component reads (a mark image: scenario.py checks
# that any component's ``image`` is one at load time).
FILE_FIELDS = ("image",)


def content_identity(obj: Any) -> dict[str, Any]:
    """What a component's config does not say but its results depend on, all of it empty for a
    built-in component with no user file (whose ids stay as they were):

    - ``code``: the hash of a plug-in module's source;
    - ``imports``: module name -> the hash of the source of each module beside a .py plug-in that
      it imports (directly or through one another): editing a helper re-runs the cells of the
      components that use it;
    - ``files``: field -> hash of the bytes of each file a ``FILE_FIELDS`` field names (an edited
      mark image trains again);
    - ``elements``: for a component built of others (``sub_components()``, e.g. chain's attacks),
      position -> that element's own ``content_identity`` where not empty (editing a plug-in attack
      re-runs the chains that use it)."""
    out: dict[str, Any] = {}
    digest = source_digest(type(obj).__module__)
    if digest is not None:
        out["code"] = digest
    imports = imported_digests(type(obj).__module__)
    if imports:
        out["imports"] = imports
    files = file_digests(obj)
    if files:
        out["files"] = files
    elements = {str(i): part for i, element in enumerate(sub_components(obj)) if (part := content_identity(element))}
    if elements:
        out["elements"] = elements
    return out


def sub_components(obj: Any) -> tuple[Any, ...]:
    """The components ``obj`` is built of (its ``sub_components()``, e.g. chain's attacks); ()."""
    method = getattr(type(obj), "sub_components", None)
    return tuple(method(obj)) if callable(method) else ()


def file_digests(obj: Any, names: Any = FILE_FIELDS) -> dict[str, str]:
    """Field -> hash of the file's bytes, for each of ``names`` among ``FILE_FIELDS`` whose value
    is a path (None, the default image shipped with wmbench, contributes nothing)."""
    out = {}
    for name in names:
        value = getattr(obj, name, None) if name in FILE_FIELDS else None
        if isinstance(value, str):
            out[name] = user_file_digest(value, name)
    return out


def user_file_digest(path: str, field: str) -> str:
    """SHA-256 (16 hex digits) of the bytes of the user's file ``path`` (``~`` expanded, relative to
    the working directory, as it is read); a ConfigError naming ``field`` when it cannot be read."""
    file = os.path.abspath(os.path.expanduser(path))
    try:
        stat = os.stat(file)
        return _file_digest(file, stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror or exc}") from None


def source_digest(module_name: str) -> str | None:
    """SHA-256 (16 hex digits) of a plug-in module's source file as it is on disk; None for
    wmbench's own modules (their ``version`` says when a stored result goes stale) and for modules
    without a source file."""
    file = _plugin_file(module_name)
    return None if file is None else _digest_on_disk(file)


def imported_digests(module_name: str) -> dict[str, str]:
    """Module name -> hash of the source of each module beside a plug-in that the module
    ``module_name`` imports, directly or through one another (``wmbench.plugin_imports``); empty
    for wmbench's own modules and for modules outside the folders of the run's .py plug-ins."""
    file = _plugin_file(module_name)
    if file is None:
        return {}
    out = {}
    for name, path in local_modules(file).items():
        try:
            out[name] = _digest_on_disk(path) or "unreadable"
        except OSError:  # found by stat, then unreadable
            out[name] = "unreadable"
    return out


def _plugin_file(module_name: str) -> str | None:
    """The source file of a module that is not wmbench's own, or None."""
    if module_name == "wmbench" or module_name.startswith(BUILTIN_PREFIX):
        return None
    return getattr(sys.modules.get(module_name), "__file__", None) or None


def _digest_on_disk(file: str) -> str | None:
    """``_file_digest`` of ``file`` as it is now; None where it cannot be read."""
    try:
        stat = os.stat(file)
    except OSError:
        return None
    return _file_digest(file, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """The hash of a file's bytes (cached while its mtime and size stay the same)."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def detect_identity(detect_args: dict[str, Any], method: Component) -> dict[str, Any]:
    """The detection part of an attack cell's id: the detect-only args, ``resync``'s version when
    asked (``wmbench.resync.VERSION``) and the method's ``detect_version`` past "1" (so ids of
    unchanged detectors stay as they were)."""
    from wmbench.resync import VERSION as RESYNC_VERSION

    version = type(method.obj).detect_version
    return {**detect_args, **({"resync": RESYNC_VERSION} if method.resync else {}), **({"detect_version": version} if version != "1" else {})}


def key_args(method: Method) -> dict[str, Any]:
    """The method's ``key_only_args`` that are not at their defaults: they enter the attack cells'
    ids, not the training's (empty for most methods)."""
    fields = {f.name: f for f in dataclasses.fields(method)}  # type: ignore[arg-type]
    unknown = sorted(set(method.key_only_args) - set(fields))
    if unknown:
        raise WmbenchError(f"method {method.name!r}: key_only_args names {unknown[0]!r}, which is not one of its fields ({', '.join(fields) or 'none'})")
    return {name: getattr(method, name) for name in sorted(method.key_only_args) if getattr(method, name) != field_default(fields[name])}


def key_args_at_defaults(method: Method) -> Method:
    """``method`` as its training sees it: the key-only args at their defaults, so every key size
    of ``none`` shares the training (and the id) of the default one."""
    changed = key_args(method)
    if not changed:
        return method
    fields = {f.name: f for f in dataclasses.fields(method)}  # type: ignore[arg-type]
    return dataclasses.replace(method, **{name: field_default(fields[name]) for name in changed})  # type: ignore[type-var]


def untouched_id(attack: Attack, strength: float) -> dict[str, bool]:
    """What marks a strength-0 cell of an attack overriding ``apply``: such cells ran the plug-in
    (not always the identity) before 2026-12-06 and are the untouched model since, so their stored
    rows are not reused; every other cell's id is unchanged."""
    return {"untouched": True} if strength == 0 and overrides_apply(attack) else {}


def expand(scenario: Scenario) -> list[TrainCell]:
    """Every training cell of the grid, `none` methods first (their figures feed other rows)."""
    methods = sorted(scenario.methods, key=lambda m: m.obj.name != "none")
    cells = []
    for dataset in scenario.datasets:
        for model in (m for m in scenario.models if m.pairs_with(dataset.label)):
            for method in methods:
                for seed in scenario.seeds:
                    method_config = identity(method.obj)
                    trained_as = identity(key_args_at_defaults(method.obj))  # key-only args share one training
                    key_only = key_args(method.obj)
                    key_files = file_digests(method.obj, key_only)  # a key-only image: the key's pixels
                    train_id = canonical_hash(
                        {
                            "format": TRAIN_FORMAT,
                            "model": identity(model.obj),
                            "dataset": identity(dataset.obj),
                            "method": {k: v for k, v in trained_as.items() if k != "detect"},
                            "training": training_identity(scenario.training),
                            "seed": seed,
                        }
                    )
                    attacks = tuple(
                        AttackCell(
                            canonical_hash(
                                {
                                    "scenario": scenario.name,
                                    "train": train_id,
                                    "labels": [model.label, dataset.label, method.label, spec.label],
                                    "detect": detect_identity(method_config["detect"], method),
                                    **({"key": key_only} if key_only else {}),
                                    **({"key_files": key_files} if key_files else {}),
                                    "attack": identity(spec.attack),
                                    "strength": strength,
                                    "detection": ID_DETECTION,
                                    **untouched_id(spec.attack, strength),
                                }
                            ),
                            spec.label,
                            spec.attack,
                            strength,
                        )
                        for spec in scenario.attacks
                        for strength in spec.strengths
                    )
                    cells.append(TrainCell(train_id, seed, model, dataset, method, attacks))
    return cells
