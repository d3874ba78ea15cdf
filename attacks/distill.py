"""Distillation: a fresh student of the same architecture learns the suspect's soft labels on a share
of the training data; the owner's weights, and any mark in them, are not copied."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded
from wmbench.registry import ATTACKS
from wmbench.train import Trainer, batches


@ATTACKS.register("distill")
@dataclass(frozen=True)
class Distill(Attack):
    """A re-initialised student of the same architecture trained on the teacher's soft labels.

    ``strength``: the share (0..1] of the training set the thief has (images only: labels are
    the teacher's softmax at ``temperature``). The student is the teacher's architecture with every
    layer re-initialised (its ``reset_parameters``), trained ``epochs`` epochs on the KL divergence
    (Hinton et al. 2015, times T^2).

    Effect: the student's top-1 agreement with the teacher on the test set (1.0 at strength 0, the
    untouched teacher)."""

    version: ClassVar[str] = "2"  # 2: frozen layers train too (the attacked copy's parameters are all trainable, 2026-12-05); strength 0's effect is 1.0, not 0.0
    untouched_effect: ClassVar[float] = 1.0

    epochs: int = bounded(5, ge=1)
    temperature: float = bounded(4.0, gt=0)
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.9, ge=0)
    weight_decay: float = bounded(5e-4, ge=0)
    batch_size: int = bounded(64, ge=2)

    def check_strength(self, strength: float) -> str | None:
        return None if 0.0 <= strength <= 1.0 else "distill strength is a share of the training data in (0, 1]"

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> nn.Module:
        teacher = model.to(ctx.device).eval()
        student = fresh_copy(teacher, ctx.rng).to(ctx.device)
        t = self.temperature

        def step(m: nn.Module, batch: tuple[Tensor, Tensor], _loss_fn, optimizer) -> Tensor:  # type: ignore[no-untyped-def]
            x, _ = batch
            with torch.no_grad():
                target = F.softmax(teacher(x) / t, dim=1)
            optimizer.zero_grad(set_to_none=True)
            log_p = F.log_softmax(m(x) / t, dim=1)
            loss = (target * (target.clamp_min(1e-12).log() - log_p)).sum(1).mean() * t * t
            loss.backward()
            optimizer.step()
            return loss.detach()

        config = ctx.retraining(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        Trainer(ctx.data, config, ctx.device, ctx.rng, "distill", ctx.progress).fit(student, step, data_fraction=strength)
        ctx.effect = agreement(student, teacher, ctx.data.test_x, ctx.device)
        return student.eval()


@torch.no_grad()
def fresh_copy(model: nn.Module, rng: torch.Generator) -> nn.Module:
    """The same architecture re-initialised (seeded by ``rng``): every module's ``reset_parameters``
    (or MultiheadAttention's ``_reset_parameters``) and running statistics; a parameter no module
    resets (a ViT's class token and position embedding) is re-drawn from a normal with its own
    mean and std, so no teacher weight reaches the student."""
    student = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))
        for m in student.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if callable(reset):
                reset()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        teacher = dict(model.named_parameters())
        for name, param in student.named_parameters():
            if param.numel() and torch.equal(param, teacher[name]):
                std = float(param.std()) if param.numel() > 1 else 0.0
                param.normal_(float(param.mean()), std)
    return student


@torch.no_grad()
def agreement(a: nn.Module, b: nn.Module, x: Tensor, device: torch.device) -> float:
    same, total = 0, 0
    for xb, _ in batches(x, torch.zeros(len(x)), 512, device):
        match = a(xb).argmax(1) == b(xb).argmax(1)  # per image, or per pixel for segmentation
        same, total = same + int(match.sum()), total + match.numel()
    return same / max(total, 1)
