"""Overwriting: the attacker embeds its own mark with the same method and a fresh key (the classic
overwrite / ambiguity attack), by the method's own embedding run for a few fine-tuning epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from wmbench.api import Attack, AttackContext, bounded
from wmbench.attacks.finetune import epochs_problem
from wmbench.data import random_share
from wmbench.models import weight_params
from wmbench.registry import ATTACKS
from wmbench.train import Trainer


@ATTACKS.register("overwrite")
@dataclass(frozen=True)
class Overwrite(Attack):
    """The attacker's own mark, embedded by the same method with a fresh key.

    ``strength``: epochs (a whole number >= 1) of the attacked method's ``embed`` with a key drawn
    from the attack's RNG, at fine-tuning learning rate ``lr`` on ``data_fraction`` of the training
    set. The attacker knows the method, not the owner's key.

    Effect: the relative L2 distance of the Conv/Linear weights to the original ones; the attacker's
    key is left in ``ctx.notes["attacker_key"]``."""

    version: ClassVar[str] = "2"  # 2: frozen layers train too (the attacked copy's parameters are all trainable, 2026-12-05)
    uses_method: ClassVar[bool] = True  # the null applies it once per method (its own embed), not once per key

    data_fraction: float = bounded(1.0, gt=0, le=1)
    lr: float = bounded(0.01, gt=0)
    momentum: float = bounded(0.9, ge=0)
    weight_decay: float = bounded(5e-4, ge=0)
    batch_size: int = bounded(64, ge=2)

    def check_strength(self, strength: float) -> str | None:
        return epochs_problem(strength)

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        if ctx.method is None:
            raise ValueError("overwrite needs the attacked method (run it from a scenario)")
        problem = epochs_problem(strength)
        if problem:
            raise ValueError(f"overwrite: {problem}, got {strength}")
        config = ctx.retraining(epochs=int(strength), batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        data = random_share(ctx.data, self.data_fraction, ctx.rng)
        model.to(ctx.device)
        before = {k: p.detach().clone() for k, p in weight_params(model).items()}
        trainer = Trainer(data, config, ctx.device, ctx.rng, "overwrite", ctx.progress)
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.rng))
        ctx.notes["attacker_key"] = ctx.method.embed(model, trainer, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            after = weight_params(model)
            moved = sum(float((after[k] - w).pow(2).sum()) for k, w in before.items())
            total = sum(float(w.pow(2).sum()) for w in before.values())
        ctx.effect = (moved / max(total, 1e-30)) ** 0.5
