"""Uniform min-max fake quantization of every Conv/Linear weight tensor to a number of bits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded
from wmbench.models import weight_params
from wmbench.registry import ATTACKS

MAX_BITS = 32  # float32 weights hold 24 significant bits: more bits is the identity

@ATTACKS.register("quantize")
@dataclass(frozen=True)
class Quantize(Attack):
    """NNWTestbed's quantization; ``strength`` is the number of bits b (an integer >= 1), so a
    HIGHER strength is a WEAKER attack (0 leaves the model untouched).

    Each tensor (or, with ``per_channel``, each output channel) is rounded to 2^b evenly spaced
    levels between its min and max; with ``symmetric`` to the integer multiples -(2^(b-1)-1)..
    2^(b-1)-1 of max|w| / (2^(b-1)-1), so zero stays exact (b = 1: w -> sign(w) max|w|).

    ``percentile`` < 100 calibrates the range as deployment quantizers do (TensorRT's percentile
    calibration): the grid spans the group's (100 - p)-th to p-th percentile (symmetric: the p-th
    percentile of |w|) and the weights outside it are clamped to its ends. A thief quantizing this
    way flattens outlying weights, such as the +-0.9 carriers of Tartaglione on a model whose other
    weights stay under 0.3 [wmbench addition: the min-max grid of NNWTestbed lets such outliers
    stretch every tensor's step; leaderboard/quantize_range_control.py measures that].

    Effect: log2 of the number of distinct values actually used, the maximum over quantization
    groups (tensors or channels): at most b, less where a tensor does not fill its grid (symmetric
    at b = 1: log2(3) = 1.58 where a tensor holds exact zeros, which sign() keeps)."""

    symmetric: bool = False
    per_channel: bool = False
    percentile: float = bounded(100.0, gt=50, le=100, added=True)

    def check_strength(self, strength: float) -> str | None:
        ok = float(strength).is_integer() and 1 <= strength <= MAX_BITS
        return None if ok else f"quantize strength is a number of bits, an integer in [1, {MAX_BITS}]"

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        bits = int(strength)
        if bits != strength or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"quantize strength is a number of bits, an integer >= 1; got {strength}")
        used = 1
        for p in weight_params(model).values():
            rows = p.detach().reshape(p.shape[0] if self.per_channel else 1, -1)
            q = quantize_rows(rows, bits, self.symmetric, self.percentile)
            p.copy_(q.view_as(p))
            used = max(used, distinct_per_row(q))
        ctx.effect = math.log2(used)


def quantize_rows(rows: Tensor, bits: int, symmetric: bool, percentile: float = 100.0) -> Tensor:
    """Each row of ``rows`` rounded to its own uniform grid of ``bits`` bits, spanning the row's
    min and max, or its percentiles (values outside are clamped to the grid's ends)."""
    x = rows.double()
    if symmetric:
        top = percentile_of_rows(x.abs(), percentile)
        if bits == 1:
            return (torch.sign(x) * top).to(rows.dtype)
        n = 2 ** (bits - 1) - 1
        step = top / n
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = torch.round(x / safe).clamp(-n, n) * safe
        return torch.where(step > 0, q, x.clamp(-top, top)).to(rows.dtype)
    lo, hi = percentile_of_rows(x, 100.0 - percentile), percentile_of_rows(x, percentile)
    step = (hi - lo) / (2**bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((x - lo) / safe).clamp(0, 2**bits - 1) * safe + lo
    return torch.where(step > 0, q, x.clamp(lo, hi)).to(rows.dtype)


def percentile_of_rows(x: Tensor, percentile: float) -> Tensor:
    """Each row's value at ``percentile`` (0: its min, 100: its max; otherwise the element of rank
    ceil(p/100 * n), no interpolation), as a column. ``kthvalue``, not ``quantile``: the latter
    refuses tensors of more than 2^24 elements (a VGG16 classifier layer has 103M)."""
    if percentile >= 100:
        return x.amax(dim=1, keepdim=True)
    if percentile <= 0:
        return x.amin(dim=1, keepdim=True)
    rank = min(max(1, math.ceil(percentile / 100 * x.shape[1])), x.shape[1])
    return x.kthvalue(rank, dim=1, keepdim=True).values


def distinct_per_row(rows: Tensor) -> int:
    """The largest number of distinct values in one row."""
    s = rows.sort(dim=1).values
    return int(((s[:, 1:] != s[:, :-1]).sum(dim=1) + 1).max())
