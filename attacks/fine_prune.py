"""Fine-pruning (Liu et al., RAID 2018): the last convolution's channels least active on clean data
are pruned, then the model is fine-tuned with them held at zero."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded, plain_step
from wmbench.structured_pruning import output_layers
from wmbench.errors import NotApplicable
from wmbench.registry import ATTACKS
from wmbench.train import Trainer, batches


@ATTACKS.register("fine_prune")
@dataclass(frozen=True)
class FinePrune(Attack):
    """Fine-pruning: the last convolution's least active channels zeroed, then fine-tuning.

    ``strength``: the share (0..1) of the last Conv2d's output channels pruned, in increasing order
    of their mean activation (after its BatchNorm, if any, and a ReLU) on ``probe`` training images;
    then ``epochs`` of plain fine-tuning (as ``finetune``) with the pruned channels kept at zero.

    Effect: the share of the last convolution's channels pruned."""

    version: ClassVar[str] = "3"  # 2: the output layer is never the pruned convolution; 3: frozen layers train too (the attacked copy's parameters are all trainable, 2026-12-05)
    epochs: int = bounded(1, ge=0)
    probe: int = bounded(512, ge=1)
    data_fraction: float = bounded(1.0, gt=0, le=1)
    lr: float = bounded(0.01, gt=0)
    momentum: float = bounded(0.9, ge=0)
    weight_decay: float = bounded(5e-4, ge=0)
    batch_size: int = bounded(64, ge=2)

    def check_strength(self, strength: float) -> str | None:
        return None if 0.0 <= strength <= 1.0 else "fine_prune strength is a share of channels in [0, 1]"

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        model.to(ctx.device).eval()
        conv, bn = last_conv(model, ctx.data.train_x[:2].to(ctx.device))
        if conv is None:
            raise NotApplicable("the model has no Conv2d before its output layer to prune")
        activation = mean_activation(model, bn if bn is not None else conv, ctx.data.train_x[: self.probe], ctx.device)
        k = min(round(strength * len(activation)), len(activation) - 1)
        pruned = torch.argsort(activation, stable=True)[:k].to(ctx.device)
        masked = [t for t in (conv.weight, conv.bias) if t is not None]
        if bn is not None and bn.affine:
            masked += [bn.weight, bn.bias]
        zero(masked, pruned)
        if self.epochs > 0:
            config = ctx.retraining(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

            def step(m: nn.Module, batch, loss_fn, optimizer) -> Tensor:  # type: ignore[no-untyped-def]
                loss = plain_step(m, batch, loss_fn, optimizer)
                zero(masked, pruned)
                return loss

            Trainer(ctx.data, config, ctx.device, ctx.rng, "fine_prune", ctx.progress).fit(model, step, data_fraction=self.data_fraction)
        ctx.effect = k / len(activation)


def last_conv(model: nn.Module, example: Tensor) -> tuple[nn.Conv2d | None, nn.modules.batchnorm._BatchNorm | None]:
    """The last Conv2d in definition order that is not an output layer (a segmentation head's or
    SqueezeNet's classifier: pruning it would delete whole classes), and the BatchNorm the scale
    attack's BN rule pairs with it."""
    outputs = {id(m) for m in output_layers(model, example)}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and id(m) not in outputs]
    if not convs:
        return None, None
    conv = convs[-1]
    try:
        from wmbench.attacks.scale import Untraceable, coupled_layers

        bn_pairs, _ = coupled_layers(model)
    except Untraceable:
        bn_pairs = []
    return conv, next((p.bn for p in bn_pairs if p.layer is conv), None)


@torch.no_grad()
def mean_activation(model: nn.Module, layer: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """Mean of ReLU(``layer``'s output) per channel over the images ``x`` (eval mode)."""
    total: list[Tensor] = []
    hook = layer.register_forward_hook(lambda _m, _i, out: total.append(out.relu().transpose(0, 1).flatten(1).mean(1).cpu()))
    try:
        for xb, _ in batches(x, torch.zeros(len(x)), 256, device):
            model(xb)
    finally:
        hook.remove()
    return torch.stack(total).mean(0)


@torch.no_grad()
def zero(tensors: list[Tensor], rows: Tensor) -> None:
    for t in tensors:
        t[rows.to(t.device)] = 0.0
