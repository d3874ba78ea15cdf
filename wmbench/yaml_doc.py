"""A scenario document before validation: YAML read strictly (YAML 1.2 numbers and booleans, no repeated key)
and ``--set key.path=value`` overrides applied to it."""

from __future__ import annotations

import re
import sys
from collections.abc import Hashable
from typing import Any, Mapping

import yaml

from wmbench.errors import ConfigError
from wmbench.names import as_typed, shown

INDEX = re.compile(r"-?[0-9]+")  # a list index in a --set path
# A scenario document, YAML aliases expanded, holds at most this many values (strings count one per
# 64 characters): a "billion laughs" alias bomb is refused before anything renders or copies it.
MAX_NODES = 100_000


def check_size(doc: Any, where: str = "", what: str = "the document") -> None:
    """Refuse a document (or a ``--set`` value: ``where``, ``what``) that expands, through YAML aliases,
    to more than MAX_NODES values."""
    budget, stack = MAX_NODES, [doc]
    while stack:
        node = stack.pop()
        budget -= 1 + (len(node) // 64 if isinstance(node, str) else 0)
        if budget < 0:
            raise ConfigError(where, f"{what} expands to more than {MAX_NODES} values (YAML aliases?): refused")
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers and booleans as YAML 1.2 (core schema) does, not as
    YAML 1.1, PyYAML's default: ``1e-6`` is a float (1.1 wants ``1.0e-6`` and reads a string); ``010`` is
    ten, ``0o10`` eight and ``0x10`` sixteen, and ``1:30``, ``0b101``, ``1_000`` are strings (1.1
    reads octal 8, sexagesimal 90, binary 5, 1000, so that ``n_carriers: 01024`` meant 532). Only
    ``true`` and ``false`` (``True``, ``TRUE``, ``False``, ``FALSE``) are booleans: ``yes``, ``no``,
    ``on``, ``off`` are strings (PyYAML's 1.1 read them as booleans, so that a label ``no`` became
    False; ``y`` and ``n``, booleans in the 1.1 spec, were strings in PyYAML already).
    It also refuses a key given twice in one mapping (PyYAML keeps the last: a second
    ``attacks:`` would silently drop the first)."""

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


INT_TAG, FLOAT_TAG, BOOL_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
# The YAML 1.2 core schema's numbers and booleans (https://yaml.org/spec/1.2.2/#1032-tag-resolution).
INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
FLOAT_12 = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
BOOL_12 = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}

# PyYAML's YAML 1.1 int, float and bool resolvers out, the 1.2 ones in: int first (``1`` matches both).
# Its timestamp resolver out too: the 1.2 core schema has none, so ``description: 2024-05-01`` is
# text (an explicit ``!!timestamp`` is still a date, which no field takes).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (INT_TAG, FLOAT_TAG, BOOL_TAG, TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(INT_TAG, INT_12, list("-+0123456789"))
_Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+0123456789."))
_Loader.add_implicit_resolver(BOOL_TAG, re.compile(f"^(?:{'|'.join(BOOL_12)})$"), list("tTfF"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer (also behind an explicit ``!!int``): decimal (leading zeros included),
    ``0o`` octal or ``0x`` hexadecimal."""
    text = loader.construct_scalar(node)
    if not isinstance(text, str) or not INT_12.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"not a YAML 1.2 integer: {shown(text)}", node.start_mark)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    if len(text.lstrip("+-")) > sys.get_int_max_str_digits():  # int() would raise a ValueError about Python's own limit
        raise yaml.constructor.ConstructorError(None, None, f"an integer of more than {sys.get_int_max_str_digits()} digits", node.start_mark)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    """A YAML 1.2 float (also behind an explicit ``!!float``)."""
    text = loader.construct_scalar(node)
    if not isinstance(text, str) or not FLOAT_12.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"not a YAML 1.2 float: {shown(text)}", node.start_mark)
    if text.lower().lstrip("+-") in (".inf", ".nan"):
        return float(text.replace(".", "", 1))
    return float(text)


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    """A YAML 1.2 boolean (also behind an explicit ``!!bool``): ``true`` or ``false``, in one of
    three cases; ``!!bool yes`` is refused rather than read as 1.1 would."""
    text = loader.construct_scalar(node)
    if not isinstance(text, str) or text not in BOOL_12:
        raise yaml.constructor.ConstructorError(None, None, f"not a YAML 1.2 boolean (true or false): {shown(text)}", node.start_mark)
    return BOOL_12[text]


def _construct_timestamp(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """A date or date and time (``2024-05-01``, also behind an explicit ``!!timestamp``): one that
    does not exist (``2024-13-45``) or is no timestamp at all (``!!timestamp x``) is malformed YAML,
    where PyYAML's own constructor raised a ValueError or an AttributeError."""
    text = loader.construct_scalar(node)
    if not isinstance(text, str) or not loader.timestamp_regexp.match(text):
        raise yaml.constructor.ConstructorError(None, None, f"not a YAML timestamp: {shown(text)}", node.start_mark)
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_timestamp(loader, node)
    except ValueError as exc:  # month 13, day 45, hour 25
        raise yaml.constructor.ConstructorError(None, None, f"not a date: {shown(text)} ({exc})", node.start_mark) from None


_Loader.add_constructor(INT_TAG, _construct_int)
_Loader.add_constructor(FLOAT_TAG, _construct_float)
_Loader.add_constructor(BOOL_TAG, _construct_bool)
_Loader.add_constructor(TIMESTAMP_TAG, _construct_timestamp)


def read_yaml(text: str) -> Any:
    """``text`` as YAML, safely (no Python objects), its numbers and booleans as YAML 1.2 reads them.
    Anything it cannot read is a ``yaml.YAMLError``, a document nested too deeply for the parser
    (``[[[[...]]]]``, thousands of levels) included: callers catch that one type (a scenario file,
    ``--set`` and ``inspect --arg`` values)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def apply_override(doc: Any, assignment: str) -> Any:
    """Set one field: ``training.epochs=2``, ``datasets[0].args.root=/data`` (or ``datasets.0...``).
    The value is read as YAML; a list entry written as a bare name becomes ``{name: ...}``. A path
    that misses is an error of the ``--set``, naming the field as errors write it."""
    path, sep, raw = assignment.partition("=")
    given = f"--set {as_typed(assignment)}"
    if not sep or not path.strip():
        raise ConfigError(given, "expected key.path=value")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError:
        raise ConfigError(given, "the value is not valid YAML") from None
    check_size(value, given, "the value")
    keys = path.strip().replace("[", ".").replace("]", "").split(".")
    if not all(keys):  # "training..epochs", ".epochs": a typo, not a path
        raise ConfigError(given, "expected key.path=value, each key non-empty")
    # Every container on the path is copied before it is edited: YAML aliases (``*a``, ``<<: *a``)
    # share one object between entries, and the assignment is to this path only.
    root: Any = {} if doc is None else _unshared(doc)
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
            else:
                node[index] = _unshared(node[index])
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if key not in node and keys[depth + 1].isdigit():  # training.milestones[0] where the file writes none
                    raise ConfigError("--set", f"{where}: not in the file, so it has no entry {keys[depth + 1]}; set the whole list: {where}=[...]")
                node[key] = _unshared(node.get(key, {}))
                node = node[key]
        else:
            raise ConfigError("--set", f"{where}: cannot set a field inside {shown(node)}")
    return root


def _unshared(node: Any) -> Any:
    """A list or mapping copied one level deep (its entries still shared); anything else as it is."""
    if isinstance(node, list):
        return list(node)
    if isinstance(node, dict):
        return dict(node)
    return node


def field_path(keys: list[str]) -> str:
    """Keys as errors write a field: ``["methods", "1", "args", "rho"]`` -> ``methods[1].args.rho``
    (an index, negative included, in brackets)."""
    out = ""
    for key in keys:
        out += f"[{key}]" if INDEX.fullmatch(key) and out else (f".{key}" if out else key)
    return out
