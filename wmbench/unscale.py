"""Finding and undoing a per-row factor ``suspect row ~ c x reference row``: the scale attack's two
rules (``wmbench.attacks.scale``) inverted, BatchNorm's and ReLU's. Shared by resync's unit
matching (``wmbench.resync``) and its fallbacks (``wmbench.resync_fallbacks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from wmbench.attention import MIN_FACTOR

if TYPE_CHECKING:
    from wmbench.attacks.scale import ReLUPair

SCALE_COS = 0.98  # a unit's factor is undone only where its row is this close to a multiple of the reference's


def weight_rows(module: nn.Module) -> Tensor:
    """A Conv/Linear's weight as (output unit, everything else), float64."""
    w = module.weight.detach().double()
    return w.reshape(w.shape[0], -1)


def live_columns(sus_rows: Tensor) -> Tensor:
    """A (1, D) 0/1 mask of the input positions that are non-zero in some suspect row. A position
    zero in every row (an input channel that structured pruning removed upstream) says nothing about
    which unit is which, while the reference's values there would lower every unit's cosine with its
    own copy (to about 0.7 at half the inputs pruned) until chance similarities win the matching."""
    return (sus_rows != 0).any(dim=0, keepdim=True).to(sus_rows.dtype)


def row_factors(ref_rows: Tensor, sus_rows: Tensor, mask: Tensor | None) -> Tensor:
    """Per row, the factor c of ``sus_row ~ c x ref_row`` (carriers masked out); 1 where the rows are
    not that close to multiples of each other (cosine below SCALE_COS)."""
    rm = ref_rows * (mask if mask is not None else 1.0) * live_columns(sus_rows)
    c = (rm * sus_rows).sum(1) / (rm * ref_rows).sum(1).clamp_min(1e-30)
    cos = (rm * sus_rows).sum(1) / (rm.norm(dim=1) * (sus_rows * (rm != 0)).norm(dim=1)).clamp_min(1e-30)
    return torch.where(cos.abs() >= SCALE_COS, c, torch.ones_like(c))


def divide_rows(module: nn.Module, c: Tensor) -> None:
    """Divide output unit i of a Conv/Linear (weight row and bias) by c[i], in place."""
    w = module.weight
    w.div_(c.to(w).view(-1, *([1] * (w.dim() - 1))))
    if getattr(module, "bias", None) is not None:
        module.bias.div_(c.to(module.bias))


def unscale_with_bn(module: nn.Module, c: Tensor, bn: nn.Module) -> None:
    """Undo ``row ~ c x reference row`` of a layer whose BatchNorm absorbed it: rows, running mean
    and variance divided by c, gamma's sign restored."""
    c = torch.where((c.abs() > MIN_FACTOR) & c.isfinite(), c, torch.ones_like(c))
    divide_rows(module, c)
    if bn.running_mean is not None and len(bn.running_mean) == len(c):
        bn.running_mean.div_(c.to(bn.running_mean))
        var = bn.running_var.double()
        bn.running_var.copy_(((var + bn.eps) / c.cpu() ** 2 - bn.eps).clamp_min(0).to(bn.running_var))
        if bn.weight is not None:
            bn.weight.mul_(c.sign().to(bn.weight))


def unscale_relu_pair(pair: ReLUPair, c: Tensor) -> None:
    """Undo ``row ~ c x reference row`` of a ReLU-rule producer in place, the scale attack's rule
    inverted: rows divided by c, the consumer's columns multiplied by it (``scale_consumer``);
    factors that ReLU does not pass (not positive, or below MIN_FACTOR) stay."""
    from wmbench.attacks.scale import scale_consumer

    c = torch.where((c > MIN_FACTOR) & c.isfinite(), c, torch.ones_like(c))
    divide_rows(pair.producer, c)
    scale_consumer(pair, c)
