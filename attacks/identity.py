"""No attack: the clean model, for scenarios that measure imperceptibility only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from wmbench.api import Attack, AttackContext
from wmbench.registry import ATTACKS


@ATTACKS.register("none")
@dataclass(frozen=True)
class NoAttack(Attack):
    """The identity at every strength; a scenario without ``attacks:`` gets this one."""

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        ctx.effect = 0.0
