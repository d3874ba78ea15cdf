"""Function-preserving permutation: the units of permutable layers are shuffled (Yan et al., KDD 2023;
Pegoraro et al., "Find the Lady", AAAI 2024).

The groups come from the model's dependency graph (``wmbench.units``, torch-pruning): a Conv/Linear's
output channels with their BatchNorm entries and the next layers' input channels; residual groups
share one permutation. A transformer's residual stream is one such group (in torchvision's ViT the
hidden dimension of the patch embedding, class token, position embedding, every LayerNorm, each
attention layer's input columns and out_proj rows, each MLP's and the head's). Each
``nn.MultiheadAttention`` is one more group: its heads, and the query/key and value dimensions
within each head, are shuffled (``wmbench.attention``). A group on a GroupNorm of several
multi-channel groups is permuted within its structure, GroupNorm groups onto GroupNorm groups
(``wmbench.norm_permutation``). Every permuted group is checked on a batch:
one whose permutation changes the output (a coupling the graph analysis missed) is undone and
counted in ``detect_note``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded
from wmbench.attention import attention_layers, random_map, rearrange, row_index
from wmbench.norm_permutation import draw_permutation
from wmbench.output_check import OutputReference
from wmbench.registry import ATTACKS
from wmbench.units import LAYERS, UnitGroup, permute_group, unit_groups

log = logging.getLogger(__name__)


@ATTACKS.register("permute")
@dataclass(frozen=True)
class Permute(Attack):
    """Random permutation of the units of a ``strength`` share (0..1) of the permutable groups.

    Effect: the share of units that moved, over all units of all permutable groups."""

    # 2: attention layers' heads and dimensions shuffled too; 3: checked in float64; 4: a transformer's
    # residual stream (ViT's hidden dimension, with its bare parameters and attention layers) permuted too,
    # and frozen layers (requires_grad off), which the dependency graph missed before; 5: a group on a
    # GroupNorm with several multi-channel groups is permuted within its structure (GroupNorm groups onto
    # groups, then within them), where before every such group was undone ("groups left unpermuted")
    version: ClassVar[str] = "5"
    tolerance: float = bounded(1e-4, gt=0)

    def check_strength(self, strength: float) -> str | None:
        return None if 0.0 <= strength <= 1.0 else "permute strength is a share of layers in [0, 1]"

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        example = ctx.data.train_x[:4].to(next(model.parameters()).device)
        result = permute_model(model, strength, ctx.rng, example, self.tolerance)
        ctx.effect = result.moved / max(result.total, 1)
        notes = [result.left_note()] if result.skipped else []
        if result.undone:
            notes.append(f"{result.undone} groups left unpermuted (their permutation changed the output)")
        if notes:
            ctx.notes["detect_note"] = "permute: " + "; ".join(notes)


class Permuted(NamedTuple):
    """What ``permute_model`` did: units moved of the ``total`` in permutable groups, groups undone
    (their permutation changed the output), groups the graph analysis could not give (``skipped``:
    concatenations, grouped convolutions, attention layers with separate key/value sizes) and the share of Conv/Linear weights in no group at all."""

    moved: int
    total: int
    undone: int
    skipped: int
    unreached: float

    def left_note(self) -> str:
        return (f"{self.skipped} unit groups could not be permuted (no channel group from the graph analysis: "
                f"e.g. concatenations, grouped convolutions, attention with separate key/value sizes); {self.unreached:.0%} of the Conv/Linear weights stay in place")


@torch.no_grad()
def permute_model(model: nn.Module, share: float, rng: torch.Generator, example: Tensor, tolerance: float = 1e-4) -> Permuted:
    """Permute the units of ``round(share * groups)`` groups chosen with ``rng``, in place (an
    attention layer counts as one group). Each permutation is checked in float64 where the model
    runs in it: there an exact one changes the output by rounding alone (in float32 a large logit's
    summation-order noise could exceed the tolerance and undo exact permutations)."""
    model.eval()
    groups, skipped = unit_groups(model, example)
    attention = attention_layers(model)
    n = len(groups) + len(attention)
    chosen = torch.randperm(n, generator=rng)[: round(share * n)].sort().values.tolist()
    reference = OutputReference.of_function(model, example, tolerance, "permute")
    with reference.precision(model):
        perms = [(groups[i], draw_permutation(groups[i], rng)) for i in chosen if i < len(groups)]
        for g, perm in perms:
            permute_group(g, perm)
        undone = 0
        if not reference.matches(model):  # find the culprits one by one
            for g, perm in reversed(perms):
                permute_group(g, torch.argsort(perm))
            kept = []
            for g, perm in perms:
                permute_group(g, perm)
                if reference.matches(model):
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
            if not reference.matches(model):
                mha.load_state_dict(saved)
                undone += 1
                log.warning("permute: shuffling the heads of %s changed the output; left unpermuted", name)
                continue
            moved += sum(int((row_index(move.heads, within) != torch.arange(mha.embed_dim)).sum()) for within in (move.qk, move.v))
    return Permuted(moved, total, undone, skipped, unreached_share(model, groups, attention))


def unreached_share(model: nn.Module, groups: list[UnitGroup], attention: list[tuple[str, nn.MultiheadAttention]]) -> float:
    """The share of Conv/Linear weights (by count) in layers that no group permutes, rows or columns."""
    reached = {id(m.module) for g in groups for m in g.members} | {id(m) for _, mha in attention for m in mha.modules()}
    sizes = [(id(m), m.weight.numel()) for m in model.modules() if isinstance(m, LAYERS) and isinstance(getattr(m, "weight", None), Tensor)]
    total = sum(size for _, size in sizes)
    return sum(size for ident, size in sizes if ident not in reached) / total if total else 0.0
