"""Key-leak overwrite (WaterMAS Table 4): the attacker knows the carriers and re-draws some of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from wmbench.api import Attack, AttackContext
from wmbench.errors import WmbenchError
from wmbench.registry import ATTACKS

log = logging.getLogger(__name__)


@ATTACKS.register("key_leak")
@dataclass(frozen=True)
class KeyLeak(Attack):
    """The attacker holds the secret key; ``strength`` is how many carriers it alters: a count when
    >= 1, a fraction of all carriers when < 1. The carriers are chosen at random and re-drawn from a
    normal law with the mean and std of their own tensor. With ``use_method_removal`` the method's
    own key-aware removal (``Method.remove``) is used instead where it has one.

    Effect: the number of carriers altered."""

    use_method_removal: bool = False

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        if ctx.key is None or ctx.method is None:
            raise WmbenchError("key_leak needs the method and its secret key (a watermarked model)")
        if strength < 0:
            raise ValueError(f"key_leak strength must be >= 0, got {strength}")
        carriers = ctx.method.carriers(ctx.key)
        total = sum(len(idx) for idx in carriers.values())
        count = min(total, round(strength) if strength >= 1 else round(strength * total))
        if self.use_method_removal and ctx.method.remove(model, ctx.key, count, ctx.rng):
            ctx.effect = float(count)
            return
        if self.use_method_removal:
            log.info("key_leak: %s has no removal of its own; overwriting carriers", ctx.method.name)
        named = dict(model.named_parameters())
        missing = [name for name in carriers if name not in named]
        if missing:
            raise WmbenchError(f"key_leak: the model has no parameter {missing[0]!r} named by the key")
        names = list(carriers)
        owner = torch.cat([torch.full((len(carriers[n]),), i) for i, n in enumerate(names)]) if names else torch.zeros(0)
        flat = torch.cat([carriers[n].cpu() for n in names]) if names else torch.zeros(0, dtype=torch.long)
        chosen = torch.randperm(total, generator=ctx.rng)[:count]
        for i, name in enumerate(names):
            idx = flat[chosen[owner[chosen] == i]]
            if len(idx) == 0:
                continue
            p = named[name]
            std = float(p.std()) if p.numel() > 1 else 0.0
            values = torch.randn(len(idx), generator=ctx.rng, dtype=torch.float64) * std + float(p.mean())
            p.view(-1)[idx.to(p.device)] = values.to(p.device, p.dtype)
        ctx.effect = float(count)
