"""Function-preserving permutation: the units of permutable layers are shuffled (Yan et al., KDD 2023;
Pegoraro et al., "Find the Lady", AAAI 2024).

The groups come from the model's dependency graph (``wmbench.units``, torch-pruning): a Conv/Linear's
output channels with their BatchNorm entries and the next layers' input channels; residual groups
share one permutation. Each ``nn.MultiheadAttention`` is one more group: its heads, and the
query/key and value dimensions within each head, are shuffled (``wmbench.attention``). Every permuted
group is checked on a batch: one whose permutation changes the output (a coupling the graph analysis
missed) is undone and counted in ``detect_note``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded
from wmbench.attention import attention_layers, random_map, rearrange, row_index
from wmbench.registry import ATTACKS
from wmbench.units import permute_group, unit_groups

log = logging.getLogger(__name__)


@ATTACKS.register("permute")
@dataclass(frozen=True)
class Permute(Attack):
    """Random permutation of the units of a ``strength`` share (0..1) of the permutable groups.

    Effect: the share of units that moved, over all units of all permutable groups."""

    version: ClassVar[str] = "2"  # 2: attention layers' heads and dimensions shuffled too
    tolerance: float = bounded(1e-4, gt=0)

    def check_strength(self, strength: float) -> str | None:
        return None if 0.0 <= strength <= 1.0 else "permute strength is a share of layers in [0, 1]"

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        example = ctx.data.train_x[:4].to(next(model.parameters()).device)
        moved, total, undone = permute_model(model, strength, ctx.rng, example, self.tolerance)
        ctx.effect = moved / max(total, 1)
        if undone:
            ctx.notes["detect_note"] = f"permute: {undone} groups left unpermuted (their permutation changed the output)"


@torch.no_grad()
def permute_model(model: nn.Module, share: float, rng: torch.Generator, example: Tensor, tolerance: float = 1e-4) -> tuple[int, int, int]:
    """Permute the units of ``round(share * groups)`` groups chosen with ``rng``, in place (an
    attention layer counts as one group). Returns (units moved, units in all groups, groups undone
    because the output changed)."""
    model.eval()
    groups, _ = unit_groups(model, example)
    attention = attention_layers(model)
    n = len(groups) + len(attention)
    chosen = torch.randperm(n, generator=rng)[: round(share * n)].sort().values.tolist()
    reference = model(example)
    scale = float(reference.abs().max()) or 1.0
    perms = [(groups[i], torch.randperm(groups[i].units, generator=rng)) for i in chosen if i < len(groups)]
    for g, perm in perms:
        permute_group(g, perm)
    undone = 0
    if not _same(model(example), reference, tolerance, scale):  # find the culprits one by one
        for g, perm in reversed(perms):
            permute_group(g, torch.argsort(perm))
        kept = []
        for g, perm in perms:
            permute_group(g, perm)
            if _same(model(example), reference, tolerance, scale):
                kept.append((g, perm))
                continue
            permute_group(g, torch.argsort(perm))
            undone += 1
            log.warning("permute: a group rooted at %s changed the output; left unpermuted", g.members[0].name)
        perms = kept
    moved = sum(int((perm != torch.arange(g.units)).sum()) for g, perm in perms)
    total = sum(g.units for g in groups) + sum(2 * mha.embed_dim for _, mha in attention)
    for name, mha in (attention[i - len(groups)] for i in chosen if i >= len(groups)):
        saved = {k: v.clone() for k, v in mha.state_dict().items()}
        move = random_map(mha, rng)
        rearrange(mha, move)
        if not _same(model(example), reference, tolerance, scale):
            mha.load_state_dict(saved)
            undone += 1
            log.warning("permute: shuffling the heads of %s changed the output; left unpermuted", name)
            continue
        moved += sum(int((row_index(move.heads, within) != torch.arange(mha.embed_dim)).sum()) for within in (move.qk, move.v))
    return moved, total, undone


def _same(out: Tensor, reference: Tensor, tolerance: float, scale: float) -> bool:
    return bool(((out - reference).abs() <= tolerance * scale + tolerance * reference.abs()).all())

