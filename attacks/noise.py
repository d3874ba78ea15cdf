"""Gaussian noise: every Conv/Linear weight tensor gets N(0, (strength x its std)^2) added."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wmbench.api import Attack, AttackContext
from wmbench.models import weight_params
from wmbench.registry import ATTACKS


@ATTACKS.register("noise")
@dataclass(frozen=True)
class GaussianNoise(Attack):
    """NNWTestbed's noise attack; ``strength`` is the noise std relative to each tensor's std.

    Effect: the relative L2 distance of the attacked Conv/Linear weights to the original ones."""

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        moved, total = 0.0, 0.0
        for p in weight_params(model).values():
            noise = torch.randn(p.shape, generator=ctx.rng) * (strength * float(p.std()))
            total += float(p.pow(2).sum())
            moved += float(noise.pow(2).sum())
            p.add_(noise.to(p.device, p.dtype))
        ctx.effect = (moved / max(total, 1e-30)) ** 0.5
