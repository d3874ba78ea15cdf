"""Greedy Residuals (Liu, Weng and Zhu, ICML 2021): bits in the signs of pooled large weights.

The weights of the chosen layer are average-pooled into one value per bit, after the smallest
entries of each pooling window have been zeroed (the "greedy" choice: only the parameters that
matter most carry the mark, so pruning, which cuts the small ones, leaves it alone); these pooled
residuals r carry the signature in their sign, enforced during training by a hinge loss
lam * sum_i max(0, margin - b_i r_i), b in {-1, +1}.
"""

from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wmbench.api import Carriers, Detection, Key, LossFn, Method, StepFn, bounded
from wmbench.data import DataBundle
from wmbench.errors import ConfigError
from wmbench.metrics import bit_detection
from wmbench.methods.uchida import default_layer, target_weight, trainable_layer, weight_name
from wmbench.registry import METHODS


def residuals(weight: Tensor, order: Tensor, bits: int, keep: float) -> Tensor:
    """r: the weight flattened in the key's ``order``, cut into ``bits`` windows of equal size
    (the rest dropped), in each window all but the ``keep`` fraction of largest |w| zeroed, then
    averaged over the window."""
    size = len(order) // bits
    windows = weight.reshape(-1)[order[: bits * size]].reshape(bits, size)
    k = max(1, math.ceil(keep * size))
    kept = torch.topk(windows.abs(), k, dim=1).indices
    return torch.gather(windows, 1, kept).sum(1) / size


def greedy_step(
    model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer,
    weight: nn.Parameter, order: Tensor, signs: Tensor, keep: float, lam: float, margin: float,
) -> Tensor:
    """One step on L + lam * sum_i max(0, margin - b_i r_i); returns the task loss."""
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    hinge = torch.relu(margin - signs * residuals(weight, order, len(signs), keep)).sum()
    (loss + lam * hinge).backward()
    optimizer.step()
    return loss.detach()


@METHODS.register("greedy_residuals")
@dataclass(frozen=True)
class GreedyResiduals(Method):
    """Greedy Residuals (ICML 2021): bits in the signs of pooled large weights, held by a hinge loss.

    Defaults and their sources:

    - ``layer=None``: [wmbench choice] one layer, Uchida's default (the middle Conv2d holding
      enough weights); the paper embeds in chosen layers of the host.
    - ``bits=256``: [wmbench choice] as Uchida and Li (capped so a window holds >= 2 weights).
    - Windows [wmbench choice]: the paper average-pools the layer's flattened weights; here they
      are flattened in a keyed random order first, so the windows are secret (the signature alone
      would otherwise let anyone read and flip the mark).
    - ``keep=0.5``: [wmbench choice] the larger half of each window by magnitude is kept (the
      smallest entries zeroed), recomputed from the current weights at every step and at detection.
    - ``lam=0.1``, ``margin=0.01`` (hinge, summed over bits): [wmbench choice] the hinge loss is
      the paper's; its weight and margin are set so that all bits hold after a few epochs on
      small_cnn/digits with the task accuracy kept.

    Detection: b_i = [r_i > 0]; statistic bit accuracy, p-value P[Binomial(bits, 1/2) >= matches].
    """

    statistic: ClassVar[str] = "bit_accuracy"
    resumable: ClassVar[bool] = True  # its step keeps no state between calls

    layer: str | None = None
    bits: int = bounded(256, ge=1)
    keep: float = bounded(0.5, gt=0, le=1)
    lam: float = bounded(0.1, ge=0)
    margin: float = bounded(0.01, ge=0)

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        layer = self.layer or default_layer(model, 2 * self.bits)
        module = trainable_layer(model, layer)
        n = module.weight.numel()
        bits = min(self.bits, n // 2)
        if bits < 1:
            raise ConfigError("layer", f"{layer!r} has too few weights ({n})")
        return Key(
            self.name,
            {"order": torch.randperm(n, generator=rng).to(torch.int32), "bits": torch.randint(0, 2, (bits,), generator=rng).to(torch.uint8)},
            {"layer": layer, "param": weight_name(model, layer), "shape": list(module.weight.shape), "bits": bits},
        )

    def step_fn(self, model: nn.Module, key: Key) -> StepFn:
        weight = target_weight(model, key)
        order = key.tensors["order"].long().to(weight.device)
        signs = (2.0 * key.tensors["bits"].float() - 1.0).to(weight.device, weight.dtype)
        return lambda m, b, f, o: greedy_step(m, b, f, o, weight, order, signs, self.keep, self.lam, self.margin)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, key: Key) -> Tensor:
        return self.step_fn(model, key)(model, batch, loss_fn, optimizer)

    def residuals(self, model: nn.Module, key: Key) -> Tensor:
        weight = target_weight(model, key).detach().double().cpu()
        return residuals(weight, key.tensors["order"].long(), len(key.tensors["bits"]), self.keep)

    def extract(self, model: nn.Module, key: Key) -> Tensor:
        return (self.residuals(model, key) > 0).float()

    def detect(self, model: nn.Module, key: Key) -> Detection:
        return bit_detection(self.extract(model, key), key.tensors["bits"])

    def carriers(self, key: Key) -> Carriers:
        size = math.prod(key.meta["shape"]) // int(key.meta["bits"])
        return {key.meta["param"]: key.tensors["order"][: int(key.meta["bits"]) * size].long()}
