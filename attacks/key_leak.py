"""Key-leak overwrite (WaterMAS Table 4): the attacker knows the carriers and re-draws some of them."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from wmbench.api import Attack, AttackContext
from wmbench.errors import NotApplicable, WmbenchError
from wmbench.registry import ATTACKS

log = logging.getLogger(__name__)


@ATTACKS.register("key_leak")
@dataclass(frozen=True)
class KeyLeak(Attack):
    """The attacker holds the secret key; ``strength`` is the fraction (0..1) of the method's
    carriers it alters, so 1.0 means all of them for every method ([wmbench choice], so that one
    strength compares methods with different numbers of carriers; the paper's Table 4 counts
    carriers). ``count: true`` reads ``strength`` as a number of carriers instead (capped at the
    carriers there are). The carriers are chosen at random and re-drawn from a normal law with the
    mean and std of their own tensor. With ``use_method_removal`` the method's own key-aware removal
    (``Method.remove``) is used instead where it has one, given the same number of carriers.

    Effect: the number of carriers altered (with ``use_method_removal``, the number handed to the
    method's removal, which may alter fewer and more besides: Li's flips whole channels with half
    that budget)."""

    version: ClassVar[str] = "2"  # 2: strength is a fraction unless count
    use_method_removal: bool = False
    count: bool = False
    uses_key: ClassVar[bool] = True  # the null applies it once per key

    def check_strength(self, strength: float) -> str | None:
        if not (math.isfinite(strength) and strength >= 0):
            return "expected a finite number >= 0"
        if not self.count and strength > 1:
            return "key_leak strength is a fraction of the carriers in [0, 1] (count: true for a number of carriers)"
        if self.count and strength != int(strength):
            return "with count: true, key_leak strength is a whole number of carriers"
        return None

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        if ctx.key is None or ctx.method is None:
            raise WmbenchError("key_leak needs the method and its secret key (a watermarked model)")
        problem = self.check_strength(strength)
        if problem:
            raise ValueError(f"{problem}, got {strength}")
        try:
            carriers = ctx.method.carriers(ctx.key)
        except NotImplementedError:
            raise NotApplicable(f"method {ctx.method.name!r} does not say where its mark is (no carriers())") from None
        total = sum(len(idx) for idx in carriers.values())
        if total == 0:
            raise NotApplicable(f"the key of {ctx.method.name!r} names no carriers: a key leak has nothing to overwrite")
        count = min(total, round(strength) if self.count else round(strength * total))
        if self.count and round(strength) > total:
            ctx.notes["detect_note"] = f"key_leak: {round(strength)} carriers asked, the key has {total}: all of them changed"
        if self.use_method_removal and ctx.method.remove(model, ctx.key, count, ctx.rng):
            ctx.effect = float(count)
            return
        if self.use_method_removal:
            log.info("key_leak: %s has no removal of its own; overwriting carriers", ctx.method.name)
        named = {**dict(model.named_buffers()), **dict(model.named_parameters())}  # a mark may sit in a buffer (BatchNorm statistics)
        missing = [name for name in carriers if name not in named]
        if missing:
            raise WmbenchError(f"key_leak: the model has no tensor {missing[0]!r}, which {ctx.method.name!r}'s carriers() names")
        fixed = [name for name in carriers if not named[name].is_floating_point()]
        if fixed:
            raise NotApplicable(f"{ctx.method.name!r}'s carriers() names {fixed[0]!r}, a tensor of {named[fixed[0]].dtype}: nothing to overwrite with noise")
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
