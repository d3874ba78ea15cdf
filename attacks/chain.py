"""Composition: several registered attacks applied one after the other (e.g. permute then scale, the
LFEA attack of Li & Wang, TIFS 2023), with no new code.

```yaml
attacks:
  - {name: chain, label: permute+scale, strengths: [1.0],
     args: {attacks: [{name: permute, strength: 1.0}, {name: scale, args: {negate: true}}]}}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from wmbench.api import Attack, AttackContext, apply_attack, overrides_apply
from wmbench.errors import ConfigError
from wmbench.model_checks import floating_dtypes, restore_precision
from wmbench.registry import ATTACKS


@ATTACKS.register("chain")
@dataclass(frozen=True)
class Chain(Attack):
    """Several attacks applied in order (compositions such as permute + scale need no new code).

    ``attacks``: each a name or ``{name, args, strength}``; an element
    without ``strength`` runs at the chain's strength, one with it at that fixed strength. Elements
    are built through the attack registry and validated when the scenario loads.

    An element that overrides ``apply`` (a plug-in returning the attacked model) is run through it,
    as a cell runs that attack alone; the others attack the chain's copy in place. Every element is
    skipped at strength 0 (the untouched model, as a cell's strength 0).

    A step that returns another precision (a thief's float16 copy) is cast back to the precision
    its input had before the next step (as a cell casts an attack's result back to the trained
    model's), and its note says so.

    Effect: the last element's effect; the elements' detect notes are joined."""

    attacks: list[Any] = field(default_factory=list)

    @property
    def uses_key(self) -> bool:
        """Whether an element reads the secret key (the null then applies the chain once per key)."""
        return any(getattr(attack, "uses_key", False) for attack, _ in self._built)  # type: ignore[attr-defined]

    @property
    def uses_method(self) -> bool:
        """Whether an element needs the attacked method (the null then applies it once per method)."""
        return any(getattr(attack, "uses_method", False) for attack, _ in self._built)  # type: ignore[attr-defined]

    @property
    def version(self) -> str:  # type: ignore[override]
        """"1" and each element's version, so that a changed element re-runs the chain's cells. An
        element overriding ``apply`` adds ":apply" (chains ran only its ``attack`` before: their
        stored cells re-run), and ":apply:0" at a fixed strength 0 (run through ``apply`` before
        2026-12-06, skipped since); built-in elements add nothing, so built-in chains keep their ids."""
        return "+".join(["1", *(f"{attack.name}={attack.version}{_apply_mark(attack, fixed)}" for attack, fixed in self._built)])  # type: ignore[attr-defined]

    def sub_components(self) -> tuple[Attack, ...]:
        """The built elements, in order: a cell's id holds what each adds to its config (a plug-in
        element's source hash, ``wmbench.grid.content_identity``), so that editing a plug-in attack
        re-runs the chains that use it; built-in elements add nothing (their ``version`` is above)."""
        return tuple(attack for attack, _ in self._built)  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        if not self.attacks:
            raise ConfigError("attacks", "list at least one attack")
        built = []
        for i, item in enumerate(self.attacks):
            name, args, strength = _element(item, i)
            attack = ATTACKS.build(name, args, f"attacks[{i}]")  # a ConfigError naming attacks[i].args.field
            if strength is not None:
                problem = attack.check_strength(strength) if strength > 0 else None
                if problem:
                    raise ConfigError(f"attacks[{i}].strength", f"{problem}, got {strength!r}")
            built.append((attack, strength))
        object.__setattr__(self, "_built", tuple(built))

    def check_strength(self, strength: float) -> str | None:
        for i, (attack, fixed) in enumerate(self._built):  # type: ignore[attr-defined]
            problem = attack.check_strength(strength) if fixed is None else None
            if problem:
                return f"attacks[{i}] ({attack.name}): {problem}"
        return None

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> nn.Module:
        notes = []
        for step, (attack, fixed) in enumerate(self._built, 1):  # type: ignore[attr-defined]
            s = strength if fixed is None else fixed
            ctx.notes.pop("detect_note", None)
            dtypes = floating_dtypes(model)  # before the step, which may cast the model in place
            if s == 0:  # skipped, whatever the element: the untouched model, as a cell's strength 0
                ctx.effect = attack.untouched_effect
            elif overrides_apply(attack):  # a plug-in's own apply, run as a cell runs a single attack
                model = apply_attack(attack, model, float(s), ctx)
            else:
                model = attack.attack(model, float(s), ctx) or model
            found, cast = restore_precision(model, dtypes)  # the next step (finetune) needs the input's precision
            said = [ctx.notes.get("detect_note"), found and f"returned {', '.join(found)} weights: cast back to {', '.join(cast)}"]
            if any(said):  # said of that step ("model unchanged" is not the chain's)
                notes.append(f"step {step} ({attack.name}): " + "; ".join(filter(None, said)))
        ctx.notes.pop("detect_note", None)
        if notes:
            ctx.notes["detect_note"] = "; ".join(notes)
        return model


def _apply_mark(attack: Attack, fixed: float | None) -> str:
    """What an element adds to the chain's version: see ``Chain.version``."""
    if not overrides_apply(attack):
        return ""
    return ":apply:0" if fixed == 0 else ":apply"


def _element(item: Any, i: int) -> tuple[str, dict[str, Any], float | None]:
    if isinstance(item, str):
        return item, {}, None
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
        raise ConfigError(f"attacks[{i}]", f"expected a name or a mapping with 'name', got {item!r}")
    unknown = set(item) - {"name", "args", "strength"}
    if unknown:
        raise ConfigError(f"attacks[{i}].{sorted(unknown)[0]}", "unknown field (valid: name, args, strength)")
    args = item.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"attacks[{i}].args", f"expected a mapping, got {args!r}")
    strength = item.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0):
        raise ConfigError(f"attacks[{i}].strength", f"expected a number >= 0, got {strength!r}")
    return item["name"], dict(args), None if strength is None else float(strength)
