"""Fine-tuning: resume plain training of all weights on (part of) the training set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from wmbench.api import Attack, AttackContext, bounded, plain_step
from wmbench.models import weight_params
from wmbench.registry import ATTACKS
from wmbench.train import Trainer


MAX_EPOCHS = 10_000


def epochs_problem(strength: float) -> str | None:
    """Why ``strength`` is not a number of epochs (a whole number in [1, MAX_EPOCHS]), or None:
    rounding would make strengths 0.5, 1 and 1.4 three rows of the same attack."""
    ok = float(strength).is_integer() and 1 <= strength <= MAX_EPOCHS
    return None if ok else f"the strength is a number of epochs, a whole number in [1, {MAX_EPOCHS}]"


@ATTACKS.register("finetune")
@dataclass(frozen=True)
class FineTune(Attack):
    """NNWTestbed's fine-tuning; ``strength`` is the number of epochs (a whole number >= 1).

    The attacker does not know the key: plain SGD steps on ``data_fraction`` of the training set
    (a random subset drawn with the attack's RNG).

    Effect: the relative L2 distance of the Conv/Linear weights to the original ones."""

    version: ClassVar[str] = "2"  # 2: frozen layers train too (the attacked copy's parameters are all trainable, 2026-12-05)

    data_fraction: float = bounded(1.0, gt=0, le=1)
    lr: float = bounded(0.01, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(5e-4, ge=0)
    batch_size: int = bounded(64, ge=2)

    def __post_init__(self) -> None:
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")

    def check_strength(self, strength: float) -> str | None:
        return epochs_problem(strength)

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        problem = epochs_problem(strength)
        if problem:
            raise ValueError(f"finetune: {problem}, got {strength}")
        epochs = int(strength)
        config = ctx.retraining(epochs=epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        model.to(ctx.device)
        before = {k: p.detach().clone() for k, p in weight_params(model).items()}
        Trainer(ctx.data, config, ctx.device, ctx.rng, "finetune", ctx.progress).fit(model, plain_step, data_fraction=self.data_fraction)
        with torch.no_grad():
            after = weight_params(model)
            moved = sum(float((after[k] - w).pow(2).sum()) for k, w in before.items())
            total = sum(float(w.pow(2).sum()) for w in before.values())
        ctx.effect = (moved / max(total, 1e-30)) ** 0.5
