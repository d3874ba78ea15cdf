"""Scenario YAML -> a validated, frozen Scenario; every error names the file and the field."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Mapping, TypeVar

import yaml

from wmbench.api import Attack, Method, bounded
from wmbench.data import Dataset
from wmbench.errors import ConfigError
from wmbench.names import lookalike_key, name_problem, output_name_problem, shown
from wmbench.models import Model
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS, Registry, bool_hint, build_dataclass, closest, load_plugins
from wmbench.results import CSV_FLOAT_FORMAT, MAX_SEED
from wmbench.safe_io import special_file
from wmbench.yaml_doc import apply_override, check_size, read_yaml
from wmbench.train import TrainingConfig

C = TypeVar("C")
TOP_LEVEL = [
    "name", "description", "seeds", "device", "plugins", "resources",
    "datasets", "models", "methods", "training", "attacks", "detection",
]
MAX_FILE_BYTES = 2**20
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")  # what wmbench runs on (mps, meta, xla: refused)
def check_name(name: Any, where: str, what: str) -> None:
    """A scenario name or label: a string without control characters, short enough in bytes to name files."""
    problem = name_problem(name, what) if isinstance(name, str) else None
    if problem:
        raise ConfigError(where, problem)


@dataclass(frozen=True)
class Component(Generic[C]):
    """A built component and the label its rows carry (default: its name)."""

    label: str
    obj: C
    datasets: tuple[str, ...] | None = None  # models only: the dataset labels it pairs with (None: all)
    resync: bool = False  # methods only: match the suspect's units to the owner's model before detection

    def pairs_with(self, dataset_label: str) -> bool:
        return self.datasets is None or dataset_label in self.datasets


@dataclass(frozen=True)
class AttackSpec:
    label: str
    attack: Attack
    strengths: tuple[float, ...]


@dataclass(frozen=True)
class DetectionConfig:
    """The ``detection:`` block: a mark is detected when its p-value is below ``threshold``."""

    threshold: float = bounded(1e-6, gt=0, lt=1)


@dataclass(frozen=True)
class Resources:
    """The ``resources:`` block: what each cell asks of a distributed executor (Ray); the local
    executor ignores it."""

    num_cpus: float = bounded(1.0, ge=0)
    num_gpus: float = bounded(0.0, ge=0)


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path | None
    seeds: tuple[int, ...]
    device: str
    datasets: tuple[Component[Dataset], ...]
    models: tuple[Component[Model], ...]
    methods: tuple[Component[Method], ...]
    training: TrainingConfig
    attacks: tuple[AttackSpec, ...]
    detection: DetectionConfig
    description: str = ""
    resources: Resources = Resources()
    plugins: tuple[str, ...] = ()  # module names and absolute .py paths, as imported
    # The validated document, so a worker process can rebuild the scenario (plug-ins included).
    source: Any = field(default=None, compare=False, repr=False)



def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = (), plugins: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read and validate a scenario file (its ``plugins`` are imported first); ``overrides`` are
    ``key.path=value`` assignments applied to the document before validation (``--set``);
    ``plugins`` (``--plugin``: module names, or .py paths relative to the working directory) are
    added to the file's own."""
    path = Path(path)
    if special_file(path):  # a FIFO waits at open for a writer that may never come; a device never ends
        raise ConfigError("", "not a regular file (a scenario is a YAML file)", str(path))
    try:
        with open(path, "rb") as fh:  # read bounded: /dev/zero or a pipe that never ends has no size to check first
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError("", f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB: not a scenario", str(path))
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read scenario: {exc.strerror or exc}", str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not a text file (a scenario is UTF-8 YAML)", str(path)) from None
    try:
        doc = read_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(at, f"malformed YAML: {getattr(exc, 'problem', None) or exc}", str(path)) from None
    try:
        check_size(doc)
        for assignment in overrides:
            doc = apply_override(doc, assignment)
        if plugins and isinstance(doc, Mapping):
            extra = [str(Path(p).resolve()) if p.endswith(".py") else p for p in plugins]
            doc = {**doc, "plugins": [*_list(doc.get("plugins", []), "plugins", str), *extra]}
        return parse_scenario(doc, path.parent, path)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None


def parse_scenario(doc: Any, base_dir: Path, path: Path | None = None) -> Scenario:
    """Validate a scenario document (a mapping as YAML gives it)."""
    if not isinstance(doc, Mapping):
        raise ConfigError("", "a scenario must be a YAML mapping")
    source = copy.deepcopy(doc)
    for key in doc:
        if key not in TOP_LEVEL:
            raise ConfigError(str(key), f"unknown field{closest(str(key), TOP_LEVEL)}")
    name = doc.get("name")
    problem = output_name_problem(name)
    if problem:
        raise ConfigError("name", problem)
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("description", f"expected a string, got {type(description).__name__}")
    plugins = tuple(_resolve_plugin(p, base_dir) for p in _list(doc.get("plugins", []), "plugins", str))
    load_plugins(list(plugins), base_dir)
    seeds = tuple(_list(doc.get("seeds", [0]), "seeds", int))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", "expected a non-empty list of distinct integers")
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seeds[{i}]", f"expected an integer in [0, 2^53] (a published CSV holds it exactly), got {seed}")
    device = doc.get("device", "auto")
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ConfigError("device", f"expected cpu, cuda, cuda:N or auto, got {shown(device)}")
    return Scenario(
        name=name,
        path=path,
        seeds=seeds,
        device=device,
        datasets=_components(doc, "datasets", DATASETS),
        models=_models(doc),
        methods=_methods(doc),
        training=_training(_section(doc, "training", {})),
        attacks=_attacks(_section(doc, "attacks", ["none"])),
        detection=build_dataclass(DetectionConfig, _section(doc, "detection", {}), "detection"),
        description=description,
        resources=build_dataclass(Resources, _section(doc, "resources", {}), "resources"),
        plugins=plugins,
        source=source,
    )


def _section(doc: Mapping[str, Any], key: str, default: Any) -> Any:
    """``doc[key]``, or ``default`` when it is absent or written empty (``training:``, null); a
    falsy value of another type (``training: []``, ``attacks: false``) is left for the section's
    own type check to refuse rather than read as the default."""
    value = doc.get(key)
    return default if value is None else value


def _training(section: Any) -> TrainingConfig:
    """The ``training:`` block. ``epochs`` below 1 is refused with its reason: every cell would
    judge a randomly initialised model as a trained one (an attack's own epochs are its own)."""
    epochs = section.get("epochs") if isinstance(section, Mapping) else None
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs < 1:
        raise ConfigError("training.epochs", f"expected at least 1 epoch, got {epochs}: a training of no epochs leaves the model "
                          "at its random initialisation, and every cell would judge it as a trained model")
    return build_dataclass(TrainingConfig, section, "training")


def _resolve_plugin(name: str, base_dir: Path) -> str:
    """A .py plug-in as an absolute path (so another process finds it); a module name as it is."""
    return str((base_dir / name).resolve()) if name.endswith(".py") else name


def _list(value: Any, where: str, kind: type) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(where, f"expected a list of {kind.__name__}, got {shown(value)}")
    return value


def _entry(item: Any, where: str, extra: tuple[str, ...] = ()) -> tuple[str, dict[str, Any], str]:
    """(name, args, label) of a list entry written as ``name`` or ``{name, args, label}``."""
    if isinstance(item, str):
        check_name(item, where, "name")
        return item, {}, item
    allowed = ["name", "args", "label", *extra]
    if isinstance(item, Mapping):  # an unknown field first: {nam: watermas} is a misspelt name, not a missing one
        for key in item:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}", f"unknown field{closest(str(key), allowed)}")
    if not isinstance(item, Mapping) or "name" not in item:
        raise ConfigError(where, f"expected a name or a mapping with 'name', got {shown(item)}")
    args = item.get("args")
    args = {} if args is None else args
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}.args", f"expected a mapping, got {shown(args)}")
    label = item.get("label", item["name"])
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{where}.label", f"expected a non-empty string, got {shown(label)}")
    check_name(label, f"{where}.label", "label")
    if label != label.strip():
        raise ConfigError(f"{where}.label", f"{shown(label)} starts or ends with spaces: its rows would look like {shown(label.strip())}'s")
    return str(item["name"]), dict(args), label


def _not_another_name(label: str, name: str, registry: Registry, where: str) -> None:
    """A label that names another registered component (``{name: tartaglione, label: none}``) would make
    its rows read as that component's (a watermark "detected" in the unwatermarked reference): refused,
    in any case and in look-alike letters (fullwidth ``ｎｏｎｅ``, Cyrillic ``nоnе``: names.lookalike_key).
    Labels may otherwise mix scripts (``watermas ρ=2``): only a look-alike of a name is refused."""
    key = lookalike_key(label)
    other = next((n for n in registry.names() if lookalike_key(n) == key and n != name), None)
    if other is not None:
        alike = "" if label.casefold() == other.casefold() else " (in look-alike letters)"
        raise ConfigError(where, f"{shown(label)} reads as the name of another {registry.kind}, {shown(other)}{alike}: rows labelled so "
                          f"would read as {shown(other)}'s; choose a label that names no {registry.kind}")


def _components(doc: Mapping[str, Any], section: str, registry: Registry, extra: tuple[str, ...] = ()) -> tuple[Component[Any], ...]:
    items = doc.get(section)
    if not isinstance(items, list) or not items:
        raise ConfigError(section, f"required: a non-empty list of {registry.kind}s{closest('', registry.names())}")
    built = []
    for i, item in enumerate(items):
        name, args, label = _entry(item, f"{section}[{i}]", extra)
        registry.get(name, f"{section}[{i}]")  # an unknown name first: its label may be the name, never written
        _not_another_name(label, name, registry, f"{section}[{i}].label")
        obj = registry.build(name, args, f"{section}[{i}]")
        _check_image(obj, f"{section}[{i}].args.image")
        built.append(Component(label, obj))
    _unique_labels([c.label for c in built], section)
    return tuple(built)


def _methods(doc: Mapping[str, Any]) -> tuple[Component[Any], ...]:
    """The methods; an entry may ask for resynchronised detection (``resync: true``, any method:
    wmbench.resync matches the attacked model's units to the trained one before detection)."""
    methods = _components(doc, "methods", METHODS, extra=("resync",))
    out = []
    for i, (method, item) in enumerate(zip(methods, doc["methods"])):
        flag = item.get("resync", False) if isinstance(item, Mapping) else False
        if not isinstance(flag, bool):
            raise ConfigError(f"methods[{i}].resync", f"expected true or false, got {shown(flag)}{bool_hint(flag)}")
        out.append(Component(method.label, method.obj, resync=flag))
    return tuple(out)


def _models(doc: Mapping[str, Any]) -> tuple[Component[Any], ...]:
    """The models; an entry may restrict itself to some datasets (``datasets: [cityscapes]``), so
    one scenario can hold classifiers on CIFAR-10 and a segmentation model on Cityscapes."""
    models = _components(doc, "models", MODELS, extra=("datasets",))
    dataset_labels = [_entry(d, "datasets")[2] for d in doc["datasets"]]
    restricted = []
    for i, (model, item) in enumerate(zip(models, doc["models"])):
        only = item.get("datasets") if isinstance(item, Mapping) else None
        if only is not None:
            where = f"models[{i}].datasets"
            if not isinstance(only, list) or not only or not all(isinstance(d, str) for d in only):
                raise ConfigError(where, f"expected a non-empty list of dataset labels, got {shown(only)}")
            for d in only:
                if d not in dataset_labels:
                    raise ConfigError(where, f"no dataset labelled {shown(d)}{closest(d, dataset_labels)}")
            model = Component(model.label, model.obj, tuple(only))
        restricted.append(model)
    return tuple(restricted)


def _attacks(items: Any) -> tuple[AttackSpec, ...]:
    if items == []:  # as if left out: the clean models only
        items = ["none"]
    if not isinstance(items, list):
        raise ConfigError("attacks", f"expected a list, got {shown(items)}")
    specs = []
    for i, item in enumerate(items):
        where = f"attacks[{i}]"
        name, args, label = _entry(item, where, ("strengths",))
        ATTACKS.get(name, where)  # an unknown name first: its label may be the name, never written
        _not_another_name(label, name, ATTACKS, f"{where}.label")
        raw = item.get("strengths") if isinstance(item, Mapping) else None
        if raw is None and name == "none":
            raw = [0]  # the identity attack (the default of a scenario with no attacks): clean rows only
        elif raw is None:  # only strength 0 would run: the attack never would
            raise ConfigError(f"{where}.strengths", "missing: list the strengths to run, e.g. strengths: [0.5, 1.0] "
                              "(strength 0, the unattacked model, is always run)")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}.strengths", f"expected a non-empty list of numbers, got {shown(raw)}")
        strengths = []
        for j, s in enumerate(raw):
            if s is None or s == "none":
                s = 0
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not _finite(s) or s < 0:
                raise ConfigError(f"{where}.strengths[{j}]", f"expected a number >= 0 (none or null: 0, the unattacked model), got {shown(s)}")
            strengths.append(float(s))
        _no_repeats(strengths, raw, f"{where}.strengths")
        attack = ATTACKS.build(name, args, where)
        if name == "none" and any(strengths):
            raise ConfigError(f"{where}.strengths", "the identity attack 'none' has only strength 0 (its rows at any other strength would repeat the clean ones)")
        if name != "none" and not any(strengths):
            raise ConfigError(f"{where}.strengths", f"only strength 0 (the unattacked model), so {name} would never run: list a strength > 0")
        for j, s in enumerate(strengths):
            problem = attack.check_strength(s) if s > 0 else None
            if problem:
                reason = problem if isinstance(problem, str) else f"out of {name}'s range (its check_strength said {shown(problem)})"
                raise ConfigError(f"{where}.strengths[{j}]", f"{reason}, got {shown(raw[j])}")
        ordered = tuple(sorted(set([0.0, *strengths])))  # strength 0 carries the clean figures
        _distinct_in_print(ordered, f"{where}.strengths")
        specs.append(AttackSpec(label, attack, ordered))
    _unique_labels([s.label for s in specs], "attacks")
    return tuple(specs)


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


def _check_image(obj: Any, where: str) -> None:
    """A component's ``image`` file (WaterMAS-style marks) must be a readable image, at load time."""
    image = getattr(obj, "image", None)
    if isinstance(image, str):
        from wmbench.image_mark import check_image

        problem = check_image(image)
        if problem:
            raise ConfigError(where, problem)


def _no_repeats(strengths: list[float], raw: list[Any], where: str) -> None:
    """A strength listed twice (``[1.0, 1.0]``, ``[1, 1.0]``) would run once: refused as the typo it
    most likely is (``[1.0, 2.0]`` meant), as seeds and labels listed twice are. Strength 0, always
    run, may be listed once."""
    first: dict[float, int] = {}
    for j, s in enumerate(strengths):
        i = first.setdefault(s, j)
        if i != j:
            raise ConfigError(f"{where}[{j}]", f"{shown(raw[j])} repeats strengths[{i}] ({shown(raw[i])}): each strength runs once; list it once")


def _distinct_in_print(strengths: tuple[float, ...], where: str) -> None:
    """Two strengths that a result CSV writes alike (0.3 and 0.3000001) would be averaged into one
    leaderboard row: refused."""
    printed: dict[str, float] = {}
    for s in strengths:
        other = printed.setdefault(CSV_FLOAT_FORMAT % s, s)
        if other != s:
            raise ConfigError(where, f"{other!r} and {s!r} are written alike ({CSV_FLOAT_FORMAT % s}) in result CSVs: "
                              "their rows would be merged; keep one, or make them differ in the first 6 significant digits")


def _unique_labels(labels: list[str], section: str) -> None:
    """Labels of one section read apart: not equal in any case or in look-alike letters (``ｗａｔｅｒｍａｓ``)."""
    seen: dict[str, str] = {}
    for i, label in enumerate(labels):
        key = lookalike_key(label)
        if key in seen:
            other = seen[key]
            how = "case" if other.casefold() == label.casefold() else "look-alike letters"
            twice = "is used twice" if other == label else f"differs from {shown(other)} only in {how}"
            raise ConfigError(f"{section}[{i}].label", f"{shown(label)} {twice}: give each entry its own label")
        seen[key] = label

