"""A scenario document before validation: YAML read strictly (YAML 1.2 floats, no repeated key)
and ``--set key.path=value`` overrides applied to it."""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

from wmbench.errors import ConfigError
from wmbench.names import shown

INDEX = re.compile(r"-?[0-9]+")  # a list index in a --set path


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-6`` as a float as YAML 1.2 does (YAML 1.1, PyYAML's
    default, wants ``1.0e-6`` and reads ``1e-6`` as a string), and refusing a key given twice in
    one mapping (PyYAML keeps the last: a second ``attacks:`` would silently drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # PyYAML refuses it itself
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """``text`` as YAML, safely (no Python objects), floats written ``1e-6`` included."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def apply_override(doc: Any, assignment: str) -> Any:
    """Set one field: ``training.epochs=2``, ``datasets[0].args.root=/data`` (or ``datasets.0...``).
    The value is read as YAML; a list entry written as a bare name becomes ``{name: ...}``. A path
    that misses is an error of the ``--set``, naming the field as errors write it."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment}", "expected key.path=value")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment}", "the value is not valid YAML") from None
    keys = path.strip().replace("[", ".").replace("]", "").split(".")
    if not all(keys):  # "training..epochs", ".epochs": a typo, not a path
        raise ConfigError(f"--set {assignment}", "expected key.path=value, each key non-empty")
    root: Any = {} if doc is None else doc
    node = root
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = field_path(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError("--set", f"{where}: no list entry {key} (the list has {len(node)}, numbered from 0)")
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
            raise ConfigError("--set", f"{where}: cannot set a field inside {shown(node)}")
    return root


def field_path(keys: list[str]) -> str:
    """Keys as errors write a field: ``["methods", "1", "args", "rho"]`` -> ``methods[1].args.rho``
    (an index, negative included, in brackets)."""
    out = ""
    for key in keys:
        out += f"[{key}]" if INDEX.fullmatch(key) and out else (f".{key}" if out else key)
    return out
