"""Gaussian noise: every Conv/Linear weight tensor gets N(0, (strength x its std)^2) added."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wmbench.api import Attack, AttackContext
from wmbench.liveness import live_map, live_share_note
from wmbench.models import weight_params
from wmbench.registry import ATTACKS


@ATTACKS.register("noise")
@dataclass(frozen=True)
class GaussianNoise(Attack):
    """NNWTestbed's noise attack; ``strength`` is the noise std relative to each tensor's std.

    Effect: the relative L2 distance of the attacked Conv/Linear weights to the original ones. On a
    model with dead weights (``wmbench.liveness``), ``detect_note`` gives that distance over the live
    weights alone, the ones that can change the output."""

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        live = live_map(model, ctx.data.train_x.shape[1:])
        moved, total, live_moved, live_total = 0.0, 0.0, 0.0, 0.0
        for name, p in weight_params(model).items():
            spread = float(p.std()) if p.numel() > 1 else float(p.abs().sum())  # one weight: its own size
            noise = torch.randn(p.shape, generator=ctx.rng) * (strength * spread)
            mask = live.mask(name).to(p.device)
            total += float(p.pow(2).sum())
            moved += float(noise.pow(2).sum())
            live_total += float(p.pow(2)[mask].sum())
            live_moved += float(noise.to(p.device).pow(2)[mask].sum())
            p.add_(noise.to(p.device, p.dtype))
        ctx.effect = (moved / max(total, 1e-30)) ** 0.5
        note = live_share_note(model, live, f"relative distance {(live_moved / max(live_total, 1e-30)) ** 0.5:.3g}")
        if note:
            ctx.notes["detect_note"] = note
