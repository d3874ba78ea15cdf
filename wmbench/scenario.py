"""Scenario YAML -> a validated, frozen Scenario; every error names the file and the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Mapping, TypeVar

import yaml

from wmbench.api import Attack, Method
from wmbench.data import Dataset
from wmbench.errors import ConfigError
from wmbench.models import Model
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS, Registry, build_dataclass, closest, load_plugins
from wmbench.train import TrainingConfig

C = TypeVar("C")
TOP_LEVEL = ["name", "description", "seeds", "device", "plugins", "datasets", "models", "methods", "training", "attacks", "detection"]


@dataclass(frozen=True)
class Component(Generic[C]):
    """A built component and the label its rows carry (default: its name)."""

    label: str
    obj: C


@dataclass(frozen=True)
class AttackSpec:
    label: str
    attack: Attack
    strengths: tuple[float, ...]


@dataclass(frozen=True)
class DetectionConfig:
    """The ``detection:`` block: a mark is detected when its p-value is below ``threshold``."""

    threshold: float = 1e-6

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


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


def load_scenario(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read and validate a scenario file (its ``plugins`` are imported first); ``overrides`` are
    ``key.path=value`` assignments applied to the document before validation (``--set``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read scenario: {exc.strerror or exc}", str(path)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(at, f"malformed YAML: {getattr(exc, 'problem', None) or exc}", str(path)) from None
    try:
        for assignment in overrides:
            doc = apply_override(doc, assignment)
        return parse_scenario(doc, path.parent, path)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None


def apply_override(doc: Any, assignment: str) -> Any:
    """Set one field: ``training.epochs=2``, ``datasets[0].args.root=/data`` (or ``datasets.0...``).
    The value is read as YAML; a list entry written as a bare name becomes ``{name: ...}``."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment}", "expected key.path=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment}", "the value is not valid YAML") from None
    keys = [k for k in path.replace("[", ".").replace("]", "").split(".") if k]
    root: Any = {} if doc is None else doc
    node = root
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(where, f"no list entry {key} (the list has {len(node)})")
            index = int(key)
            if not last and isinstance(node[index], str):
                node[index] = {"name": node[index]}
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(where, f"cannot set a field inside {node!r}")
    return root


def parse_scenario(doc: Any, base_dir: Path, path: Path | None = None) -> Scenario:
    """Validate a scenario document (a mapping as YAML gives it)."""
    if not isinstance(doc, Mapping):
        raise ConfigError("", "a scenario must be a YAML mapping")
    for key in doc:
        if key not in TOP_LEVEL:
            raise ConfigError(str(key), f"unknown field{closest(str(key), TOP_LEVEL)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError("name", "required: a non-empty name without '/' (it names the output files)")
    load_plugins(_list(doc.get("plugins", []), "plugins", str), base_dir)
    seeds = tuple(_list(doc.get("seeds", [0]), "seeds", int))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", "expected a non-empty list of distinct integers")
    device = doc.get("device", "auto")
    if not isinstance(device, str):
        raise ConfigError("device", f"expected a string such as cpu, cuda or auto, got {device!r}")
    return Scenario(
        name=name,
        path=path,
        seeds=seeds,
        device=device,
        datasets=_components(doc, "datasets", DATASETS),
        models=_components(doc, "models", MODELS),
        methods=_components(doc, "methods", METHODS),
        training=build_dataclass(TrainingConfig, doc.get("training") or {}, "training"),
        attacks=_attacks(doc.get("attacks") or ["none"]),
        detection=build_dataclass(DetectionConfig, doc.get("detection") or {}, "detection"),
        description=str(doc.get("description", "")),
    )


def _list(value: Any, where: str, kind: type) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ConfigError(where, f"expected a list of {kind.__name__}, got {value!r}")
    return value


def _entry(item: Any, where: str, extra: tuple[str, ...] = ()) -> tuple[str, dict[str, Any], str]:
    """(name, args, label) of a list entry written as ``name`` or ``{name, args, label}``."""
    if isinstance(item, str):
        return item, {}, item
    if not isinstance(item, Mapping) or "name" not in item:
        raise ConfigError(where, f"expected a name or a mapping with 'name', got {item!r}")
    allowed = ["name", "args", "label", *extra]
    for key in item:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", f"unknown field{closest(str(key), allowed)}")
    args = item.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}.args", f"expected a mapping, got {args!r}")
    label = item.get("label", item["name"])
    if not isinstance(label, str) or not label:
        raise ConfigError(f"{where}.label", f"expected a non-empty string, got {label!r}")
    return str(item["name"]), dict(args), label


def _components(doc: Mapping[str, Any], section: str, registry: Registry) -> tuple[Component[Any], ...]:
    items = doc.get(section)
    if not isinstance(items, list) or not items:
        raise ConfigError(section, f"required: a non-empty list of {registry.kind}s{closest('', registry.names())}")
    built = []
    for i, item in enumerate(items):
        name, args, label = _entry(item, f"{section}[{i}]")
        built.append(Component(label, registry.build(name, args, f"{section}[{i}]")))
    _unique_labels([c.label for c in built], section)
    return tuple(built)


def _attacks(items: Any) -> tuple[AttackSpec, ...]:
    if not isinstance(items, list):
        raise ConfigError("attacks", f"expected a list, got {items!r}")
    specs = []
    for i, item in enumerate(items):
        where = f"attacks[{i}]"
        name, args, label = _entry(item, where, ("strengths",))
        raw = item.get("strengths", [0]) if isinstance(item, Mapping) else [0]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}.strengths", f"expected a non-empty list of numbers, got {raw!r}")
        strengths = []
        for j, s in enumerate(raw):
            if s is None or s == "none":
                s = 0
            if isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0:
                raise ConfigError(f"{where}.strengths[{j}]", f"expected a number >= 0 (or none), got {s!r}")
            strengths.append(float(s))
        ordered = tuple(sorted(set([0.0, *strengths])))  # strength 0 carries the clean figures
        specs.append(AttackSpec(label, ATTACKS.build(name, args, where), ordered))
    _unique_labels([s.label for s in specs], "attacks")
    return tuple(specs)


def _unique_labels(labels: list[str], section: str) -> None:
    seen = set()
    for i, label in enumerate(labels):
        if label in seen:
            raise ConfigError(f"{section}[{i}].label", f"{label!r} is used twice: give each entry its own label")
        seen.add(label)

