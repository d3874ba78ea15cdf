"""Uniform min-max fake quantization of every Conv/Linear weight tensor to a number of bits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext
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

    Effect: log2 of the number of distinct values actually used, the maximum over quantization
    groups (tensors or channels): at most b, less where a tensor does not fill its grid."""

    symmetric: bool = False
    per_channel: bool = False

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
            q = quantize_rows(rows, bits, self.symmetric)
            p.copy_(q.view_as(p))
            used = max(used, distinct_per_row(q))
        ctx.effect = math.log2(used)


def quantize_rows(rows: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Each row of ``rows`` rounded to its own uniform grid of ``bits`` bits."""
    x = rows.double()
    if symmetric:
        top = x.abs().amax(dim=1, keepdim=True)
        if bits == 1:
            return (torch.sign(x) * top).to(rows.dtype)
        n = 2 ** (bits - 1) - 1
        step = top / n
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = torch.round(x / safe).clamp(-n, n) * safe
        return torch.where(step > 0, q, x).to(rows.dtype)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    step = (hi - lo) / (2**bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((x - lo) / safe).clamp(0, 2**bits - 1) * safe + lo
    return torch.where(step > 0, q, x).to(rows.dtype)


def distinct_per_row(rows: Tensor) -> int:
    """The largest number of distinct values in one row."""
    s = rows.sort(dim=1).values
    return int(((s[:, 1:] != s[:, :-1]).sum(dim=1) + 1).max())
