"""Errors raised by a component, re-addressed to the scenario entry that configured it."""

from __future__ import annotations

import dataclasses
from typing import Any

from wmbench.errors import ConfigError, Incompatible
from wmbench.scenario import AttackSpec, Component, Scenario


def blame(exc: ConfigError, scenario: Scenario, section: str, component: Component[Any] | AttackSpec) -> ConfigError:
    """``exc`` (raised by a component, naming one of its fields or none) re-addressed to the
    scenario entry: ``section[i].args.FIELD`` when the field is one of its args, else ``section[i]``."""
    if exc.file:  # already addressed
        return exc
    entries: Any = {"datasets": scenario.datasets, "models": scenario.models, "methods": scenario.methods,
                    "attacks": scenario.attacks}[section]
    index = [c.label for c in entries].index(component.label)
    obj = component.attack if isinstance(component, AttackSpec) else component.obj
    fields = {f.name for f in dataclasses.fields(obj)}
    field = exc.field.removeprefix("args.")  # a component may name its field either way
    where = f"{section}[{index}].args.{field}" if field in fields else f"{section}[{index}]"
    return ConfigError(where, exc.message, str(scenario.path) if scenario.path else None)


def blame_attack(exc: ConfigError, scenario: Scenario, label: str) -> ConfigError:
    """``blame`` for the attack entry labelled ``label``: ``attacks[i].args.FIELD`` or ``attacks[i]``."""
    spec = next(s for s in scenario.attacks if s.label == label)
    return blame(exc, scenario, "attacks", spec)


def addressed(exc: ConfigError, scenario: Scenario, section: str, component: Component[Any]) -> ConfigError | Incompatible:
    """``blame``: ``exc`` naming the scenario entry; a model's or a method's error in a grid of several
    model-dataset pairs is about one pair only, so ``Incompatible`` (its cells fail, the grid goes on)."""
    blamed = blame(exc, scenario, section, component)
    if section in ("models", "methods") and len(scenario.models) * len(scenario.datasets) > 1:
        return Incompatible(str(blamed))
    return blamed


def incompatible(exc: ConfigError, scenario: Scenario, section: str, component: Component[Any]) -> Incompatible:
    """``addressed``, for a caller that skips an incompatible pair: the Incompatible, or the
    ConfigError raised when the scenario itself is wrong."""
    error = addressed(exc, scenario, section, component)
    if not isinstance(error, Incompatible):
        raise error from None
    return error
