"""Typed registries of components (methods, attacks, models, datasets) built from YAML args."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import os
import sys
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Callable, Generic, Mapping, TypeVar

from wmbench.errors import ConfigError, WmbenchError
from wmbench.names import shown
from wmbench.plugin_imports import add_folder, imported_as, shadowing_problem
from wmbench.statistic_kinds import STATISTICS

log = logging.getLogger(__name__)
T = TypeVar("T")


def closest(word: str, choices: list[str]) -> str:
    """A ' (did you mean ...?)' hint naming the valid choices closest to ``word``, whatever its case
    (``NAME``, ``Seeds``, ``WaterMAS`` are near misses too)."""
    folded: dict[str, list[str]] = {}
    for choice in choices:
        folded.setdefault(choice.casefold(), []).append(choice)
    near = [c for f in difflib.get_close_matches(word.casefold(), list(folded), n=3, cutoff=0.5) for c in folded[f]][:3]
    shown = near or sorted(choices)
    label = "did you mean" if near else "valid names"
    return f" ({label}: {', '.join(shown)})" if shown else ""


class Registry(Generic[T]):
    """Maps names to frozen dataclasses of one kind and builds them from YAML ``args``."""

    def __init__(self, kind: str, builtin_module: str, entry_point_group: str, check: Callable[[type], str | None] | None = None) -> None:
        self.kind = kind
        self.builtin_module = builtin_module
        self.entry_point_group = entry_point_group
        self.check = check  # what is wrong with a class of this kind beyond its dataclass-ness, or None
        self._classes: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@METHODS.register("watermas")`` on a frozen dataclass."""

        def decorate(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                raise TypeError(f"{self.kind} {name!r}: {cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
            if inspect.isabstract(cls):  # else it would list fine and fail only when a scenario builds it
                missing = ", ".join(sorted(cls.__abstractmethods__))  # type: ignore[attr-defined]
                raise TypeError(f"{self.kind} {name!r}: {cls.__name__} does not implement {missing}")
            problem = _signature_problem(cls) or (self.check(cls) if self.check else None)
            if problem:
                raise TypeError(f"{self.kind} {name!r}: {cls.__name__} {problem}")
            self._load_entry_points()  # a plug-in taking a built-in's name fails now, not when the built-ins load
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)

    def get(self, name: str, where: str = "") -> type[T]:
        """The class registered as ``name``; a ConfigError with suggestions otherwise."""
        self._load_entry_points()
        if name not in self._classes:
            silent = f"; plug-in {', '.join(_SILENT_PLUGINS)} registered nothing (a missing @{self.kind.upper()}S.register(...)?)" if _SILENT_PLUGINS else ""
            raise ConfigError(where, f"unknown {self.kind} {shown(name)}{closest(name, list(self._classes))}{silent}")
        return self._classes[name]

    def build(self, name: str, args: Mapping[str, Any] | None = None, where: str = "") -> T:
        """Instantiate ``name`` with ``args`` checked against its dataclass fields."""
        cls = self.get(name, where)
        return build_dataclass(cls, args or {}, f"{where}.args" if where else "args")

    def _load_entry_points(self) -> None:
        """Import the built-in components, then those of installed packages' entry points (once)."""
        if self._loaded:
            return
        self._loaded = True  # set first: the built-ins register themselves while importing
        try:
            importlib.import_module(self.builtin_module)
        except BaseException as exc:
            self._loaded = False
            if not isinstance(exc, ModuleNotFoundError) or exc.name != self.builtin_module:
                raise
            raise WmbenchError(
                f"{self.builtin_module} is not importable: wmbench runs from a source tree that is not installed "
                "(its methods/ and attacks/ folders are installed as wmbench.methods and wmbench.attacks); "
                "run `pip install -e .` in the checkout, or run from another directory with wmbench installed"
            ) from None
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except Exception as exc:  # a broken plug-in must not hide the others
                log.warning("could not load %s plug-in %r: %s", self.kind, ep.name, exc)


def build_dataclass(cls: type[T], args: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a mapping, naming the field of any unknown or mistyped value."""
    if not isinstance(args, Mapping):
        raise ConfigError(where, f"expected a mapping of arguments, got {type(args).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in args.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}", f"unknown field{closest(str(key), list(fields))}")
        values[key] = coerce(value, hints.get(key, Any), f"{where}.{key}")
        bounds = fields[key].metadata.get("range")
        problem = bounds.problem(values[key]) if bounds is not None else None
        if problem:
            raise ConfigError(f"{where}.{key}", problem)
    try:
        obj = cls(**values)
    except ConfigError as exc:  # a field's own check (__post_init__), naming the field
        raise ConfigError(f"{where}.{exc.field}" if exc.field else where, exc.message) from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError(where, str(exc)) from None
    return obj


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, str, bool, Optional, list, Literal)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(where, f"expected {_hint_name(hint)}, got {shown(value)}{bool_hint(value) if bool in options else ''}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(where, f"expected one of {list(typing.get_args(hint))}, got {shown(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {shown(value)}")
        args = typing.get_args(hint) or (Any,)
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:  # tuple[int, str]: one type per position
            if len(value) != len(args):
                raise ConfigError(where, f"expected {len(args)} items ({_hint_name(hint)}), got {shown(value)}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping, got {shown(value)}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {coerce(k, key_hint, where): coerce(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if value in (member.name, member.value):
                return member
        raise ConfigError(where, f"expected one of {[m.name for m in hint]}, got {shown(value)}")
    if isinstance(hint, type) and issubclass(hint, PurePath) and isinstance(value, str):
        return hint(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(where, f"expected true or false, got {shown(value)}{bool_hint(value)}")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(where, f"number out of range: {shown(value)}") from None
            if math.isnan(number):
                raise ConfigError(where, "expected a number, got nan")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value
    raise ConfigError(where, f"expected {_hint_name(hint)}, got {shown(value)}")


def bool_hint(value: Any) -> str:
    """What to add to the error of a boolean field given a string: scenarios are read as YAML 1.2,
    where ``yes``, ``no``, ``on`` and ``off`` (booleans in YAML 1.1) are strings."""
    if not (isinstance(value, str) and value.lower() in {"yes", "no", "on", "off", "y", "n"}):
        return ""
    return " (a string: scenarios are read as YAML 1.2, where only true and false are booleans; write true or false)"


def _hint_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):  # Optional[int]: "int | None", not "Optional"
        return " | ".join("None" if a is type(None) else _hint_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def summary(cls: type) -> str:
    """The first line of a component's docstring (dataclasses' generated ones are skipped)."""
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(f"{cls.__name__}(") else doc.split("\n")[0]


def description(cls: type) -> str:
    """A component's whole docstring, dedented (dataclasses' generated ones are skipped)."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def dataclass_params(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of each field, for ``wmbench list``; a declared range follows the type."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        bounds, hint = f.metadata.get("range"), hints.get(f.name, Any)
        shown_bounds = "" if bounds is None or hint is bool else f" {bounds}" if str(bounds).startswith("(") else f" ({bounds})"
        kind = _hint_name(hint) + shown_bounds
        rows.append((f.name, kind, default))
    return rows


def load_plugins(names: list[str], base_dir: Path, where: str = "plugins") -> None:
    """Import the user's plug-in modules: dotted module names, or .py paths relative to ``base_dir``."""
    _SILENT_PLUGINS.clear()  # named in this scenario's unknown-name errors only
    for i, name in enumerate(names):
        if name.endswith(".py"):
            path = (base_dir / name).resolve()
            if not path.is_file():
                raise ConfigError(f"{where}[{i}]", f"plug-in file not found: {path}")
            add_folder(path.parent)  # its imports find the modules beside it, as `python my_method.py`'s do
            digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
            module_name = f"wmbench_plugin_{path.stem}_{digest}"  # two plug-ins may share a file name
            if module_name in sys.modules:
                continue
            problem = shadowing_problem(str(path))
            if problem:
                raise ConfigError(f"{where}[{i}]", f"plug-in {path} {problem}")
            earlier = sys.modules.get(path.stem)
            if getattr(earlier, "__file__", None) and os.path.realpath(earlier.__file__) == str(path):  # type: ignore[union-attr]
                sys.modules[module_name] = earlier  # an earlier plug-in imported it by name: it ran (and registered) then
                continue
            alias = imported_as(path)  # `import my_method` in a module beside it gets this module, not a second copy
            registered = sum(len(r._classes) for r in REGISTRIES)  # its imports may register for it
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            if alias:
                sys.modules[alias] = module
            try:
                spec.loader.exec_module(module)
            except (Exception, SystemExit) as exc:  # the user's code (a sys.exit() included): report it on one line
                del sys.modules[module_name]
                if alias:
                    sys.modules.pop(alias, None)
                raise ConfigError(f"{where}[{i}]", f"plug-in {path} failed to load: {type(exc).__name__}: {exc}") from None
            if sum(len(r._classes) for r in REGISTRIES) == registered:
                _SILENT_PLUGINS.append(path.name)
        else:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                beside = base_dir / f"{name.replace('.', '/')}.py"
                missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None and name.startswith(exc.name)
                hint = f" ({beside} is a file: name it with its .py, {shown(name.replace('.', '/') + '.py')}, to load it)" if missing and beside.is_file() else ""
                raise ConfigError(f"{where}[{i}]", f"cannot import plug-in module {shown(name)}: {exc}{hint}") from None
            except Exception as exc:
                raise ConfigError(f"{where}[{i}]", f"plug-in module {shown(name)} failed to load: {type(exc).__name__}: {exc}") from None


def _signature_problem(cls: type) -> str | None:
    """An overridden public method that cannot take the arguments its base class's method takes
    (``def detect(self, model)`` for ``detect(self, model, key)``): found at registration rather
    than as a TypeError after hours of training."""
    for name, function in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("_"):
            continue
        owner = next(k for k in cls.__mro__ if name in vars(k))
        later = cls.__mro__[cls.__mro__.index(owner) + 1 :]
        base = next((k for k in later if inspect.isfunction(vars(k).get(name))), None)
        if base is None:
            continue
        expected = inspect.signature(vars(base)[name])
        positional = [p for p in expected.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keywords = {p.name: None for p in expected.parameters.values() if p.kind is p.KEYWORD_ONLY}
        if isinstance(vars(owner)[name], staticmethod):  # called on an instance without self
            positional = positional[1:]
        try:
            inspect.signature(function).bind(*[None] * len(positional), **keywords)
        except TypeError:
            def params(signature: inspect.Signature) -> str:
                return f"{name}({', '.join(signature.parameters)})"

            return f"overrides {params(inspect.signature(function))}, which cannot take the arguments of {params(expected)}"
    return None


def _statistic_problem(cls: type) -> str | None:
    """Why a method's declared ``statistic`` is not one the leaderboard knows, or None."""
    declared = getattr(cls, "statistic", "")
    if declared == "" or declared in STATISTICS:
        return None
    return f"declares statistic {shown(declared)}: expected one of {', '.join(STATISTICS)}, or \"\" for none"


# The four registries; each imports its built-in module on first use.
METHODS: Registry = Registry("method", "wmbench.methods", "wmbench.methods", check=_statistic_problem)
ATTACKS: Registry = Registry("attack", "wmbench.attacks", "wmbench.attacks")
MODELS: Registry = Registry("model", "wmbench.models", "wmbench.models")
DATASETS: Registry = Registry("dataset", "wmbench.datasets", "wmbench.datasets")
REGISTRIES = (METHODS, ATTACKS, MODELS, DATASETS)
_SILENT_PLUGINS: list[str] = []  # plug-in files that registered no component (named when a name is unknown)
