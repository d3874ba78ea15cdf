"""Neural structural obfuscation (Yan et al., USENIX Security 2023): dummy units that leave the
function unchanged are added to hidden layers, then every layer's units are permuted.

Three kinds of dummy, added in turn until a layer has ``strength`` x its units more:

- ``zero``: a new unit with random incoming weights and zero outgoing weights;
- ``clique``: ``clique_size`` new units with one shared random incoming row (so equal activations)
  whose outgoing weights sum to zero;
- ``split``: an existing unit copied ``split_ways - 1`` times, its outgoing weights shared among
  the copies (fractions summing to one).

Layers are the permutable groups of ``wmbench.units`` with one producing Conv/Linear (residual
streams, depthwise and squeeze-excitation groups are left at their size, then permuted; a
transformer's residual stream too: a unit added there would join its LayerNorms' statistics; and
any group on a GroupNorm, for the same reason with its groups' statistics, counted in
``detect_note``). Shapes
change: position-keyed detection reports NotApplicable unless it is resynchronised
(``resync: true``), which matches the units back and collapses the duplicates.

The grown model is checked against the original's outputs on a batch (in float64 where the model
runs in it, to ``permute``'s tolerance), as ``permute`` checks its permutations: a layer whose
dummies change the output (a coupling the graph analysis misses, e.g. ``F.normalize`` over the
channels, whose norm the new units join) is put back to its size and counted in ``detect_note``;
where that leaves no layer grown, the attack does not apply.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded
from wmbench.errors import NotApplicable
from wmbench.output_check import OutputReference
from wmbench.registry import ATTACKS
from wmbench.units import LAYERS, Snapshot, UnitGroup, assign, is_depthwise, refresh_shape, unit_groups

from .permute import permute_model

log = logging.getLogger(__name__)

DummyKind = Literal["zero", "clique", "split"]


MAX_GROWTH = 16.0  # 17x the units of every layer: far past any published attack, and a bound on memory
TOLERANCE = 1e-4  # permute's default: the grown model's outputs within 1e-4 of the largest and of each


@ATTACKS.register("dummy_neurons")
@dataclass(frozen=True)
class DummyNeurons(Attack):
    """Neural structural obfuscation: function-preserving dummy units added, then all units permuted.

    Adds ``strength`` x units (at least one) of dummies to each eligible layer,
    then permutes all layers (``permute: false`` to keep the dummies at the end).

    Effect: units added over the units of the eligible layers before the attack. A layer whose
    dummies change the model's output on a batch is left at its size (``detect_note`` says how
    many); none left to grow: NotApplicable."""

    # 2: its permutation shuffles attention heads too; 3: checked in float64; 4: it moves a transformer's
    # residual stream too (attacks/permute.py), and frozen layers (requires_grad off), which it missed before;
    # 5: its permutation moves GroupNorm layers within their groups (permute's version 5: it left them in
    # place before, without a word), and detect_note counts the GroupNorm layers it does not grow
    version: ClassVar[str] = "5"
    kinds: list[DummyKind] = field(default_factory=lambda: ["zero", "clique", "split"])
    clique_size: int = bounded(2, ge=2)
    split_ways: int = bounded(2, ge=2)
    permute: bool = True

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("kinds must name at least one of zero, clique, split")

    def check_strength(self, strength: float) -> str | None:
        ok = math.isfinite(strength) and 0 <= strength <= MAX_GROWTH
        return None if ok else f"dummy_neurons strength is the units added per unit, in [0, {MAX_GROWTH:g}] (memory grows with it)"

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        device = next(model.parameters()).device
        example = ctx.data.train_x[:4].to(device)
        model.eval()
        found = unit_groups(model, example)[0]
        groups = [g for g in found if eligible(g)]
        normed = sum(1 for g in found if g.norms)  # GroupNorm layers: never grown (permuted like the others)
        normed_note = f"{normed} GroupNorm layers left at their size (added units would join their groups' statistics)"
        if not groups:  # e.g. grouped or depthwise convolutions only, a layer used twice, GroupNorm layers
            raise NotApplicable("dummy_neurons: no layer of this model can take added units" + (f" ({normed_note})" if normed else ""))
        before = sum(g.units for g in groups)
        reference = OutputReference.of_function(model, example, TOLERANCE, "dummy_neurons")  # the original's outputs: each growth is checked against them
        counts = [max(1, round(strength * g.units)) for g in groups]
        states = []  # the generator's state before each group grows, to grow it again the same way
        saved = []  # each group's tensors before it grew (replaced by the growth, never written in place)
        added = []
        for g, count in zip(groups, counts):
            states.append(ctx.rng.get_state())
            saved.append(Snapshot(g, copy_values=False))
            added.append(self._grow(g, count, ctx.rng))
        grown = list(range(len(groups)))
        if not reference.kept(model):  # find the layers whose dummies changed the output, one by one
            after = ctx.rng.get_state()
            for snapshot in reversed(saved):
                snapshot.restore()
            grown = []
            for i, (g, count) in enumerate(zip(groups, counts)):
                ctx.rng.set_state(states[i])
                snapshot = Snapshot(g, copy_values=False)
                added[i] = self._grow(g, count, ctx.rng)
                if reference.kept(model):
                    grown.append(i)
                    continue
                snapshot.restore()
                log.warning("dummy_neurons: units added to the layer of %s changed the output; left at its size", g.members[0].name)
            ctx.rng.set_state(after)  # the permutation draws what it would have
            if not grown:
                raise NotApplicable(f"dummy_neurons: adding units to any of the {len(groups)} eligible layers changed the model's output")
        total = sum(added[i] for i in grown)
        if self.permute:
            permute_model(model, 1.0, ctx.rng, example)
        ctx.effect = total / max(before, 1)
        notes = [f"dummy_neurons: {total} units added to {len(grown)} layers (shapes changed)"]
        if len(grown) < len(groups):
            notes.append(f"{len(groups) - len(grown)} layers left at their size (their added units changed the output)")
        if normed:
            notes.append(normed_note)
        ctx.notes["detect_note"] = "; ".join(notes)

    def _grow(self, g: UnitGroup, count: int, rng: torch.Generator) -> int:
        """Append at least ``count`` dummy units to group ``g``; returns how many."""
        producer = g.producers[0]
        rows = producer.module.weight.detach()
        n = g.units
        sources: list[int] = []  # per new unit: the existing unit whose row (or BN entries) it copies
        new_rows: list[Tensor] = []
        outgoing: list[tuple[str, int | Tensor]] = []  # per new unit: ("zero"|"random"|"split", data)
        turn = 0
        std = float(rows.std()) if rows.numel() > 1 else 1.0
        split: set[int] = set()
        while len(sources) < count:
            kind = self.kinds[turn % len(self.kinds)]
            turn += 1
            u = int(torch.randint(n, (1,), generator=rng))
            if kind == "split" and u in split:
                free = sorted(set(range(n)) - split)
                if not free:
                    kind = "zero"
                else:
                    u = free[int(torch.randint(len(free), (1,), generator=rng))]
            if kind == "zero":
                sources.append(u)
                new_rows.append(torch.randn(rows.shape[1:], generator=rng, dtype=torch.float64) * std)
                outgoing.append(("zero", 0))
            elif kind == "clique":
                row = torch.randn(rows.shape[1:], generator=rng, dtype=torch.float64) * std
                seed = int(torch.randint(2**31, (1,), generator=rng))
                for j in range(self.clique_size):
                    sources.append(u)
                    new_rows.append(row)
                    outgoing.append(("clique", torch.tensor([seed, j, self.clique_size])))
            else:
                split.add(u)
                share = torch.rand(self.split_ways, generator=rng, dtype=torch.float64) + 0.1
                share = share / share.sum()
                for j in range(1, self.split_ways):
                    sources.append(u)
                    new_rows.append(rows[u].double().cpu())
                    outgoing.append(("split", torch.tensor([u, j]).double()))
                outgoing.append(("split_keep", torch.cat([torch.tensor([float(u)]), share])))
        m = len(sources)
        src = torch.tensor(sources)
        for member in g.members:
            mod = member.module
            if member.kind == "out":
                for name in member.names:
                    t = getattr(mod, name).detach()
                    if name == "weight" and isinstance(mod, LAYERS):
                        extra = torch.stack(new_rows).to(t)
                    else:
                        extra = t[src.to(t.device)]
                    assign(mod, name, torch.cat([t, extra]))
            else:
                assign(mod, "weight", _columns(mod.weight.detach(), member.pos, outgoing, m, rng))
            refresh_shape(mod)
        return m


def _columns(w: Tensor, pos: Tensor, outgoing: list, m: int, rng: torch.Generator) -> Tensor:  # type: ignore[type-arg]
    """A consumer's weight with the new units' input columns appended (``k`` per unit) and split
    units' columns shared with their copies."""
    k = pos.shape[1]
    w = w.clone()
    new = torch.zeros((w.shape[0], m * k, *w.shape[2:]), dtype=w.dtype, device=w.device)
    std = float(w.std()) if w.numel() > 1 else 1.0
    cliques: dict[int, Tensor] = {}
    shares: dict[int, Tensor] = {}
    for entry, data in outgoing:
        if entry == "split_keep":
            shares[int(data[0])] = data[1:]
    originals = {u: w[:, pos[u]].clone() for u in shares}
    i = 0
    for entry, data in outgoing:
        if entry == "split_keep":
            u, share = int(data[0]), data[1:]
            w[:, pos[u]] = (originals[u].double() * share[0]).to(w)
            continue
        cols = slice(i * k, (i + 1) * k)
        if entry == "clique":
            seed, j, size = (int(x) for x in data)
            if seed not in cliques:
                g = torch.Generator().manual_seed(seed)
                v = torch.randn((size, w.shape[0], k, *w.shape[2:]), generator=g, dtype=torch.float64) * std
                v[-1] = -v[:-1].sum(0)
                cliques[seed] = v
            new[:, cols] = cliques[seed][j].to(w)
        elif entry == "split":
            u, j = int(data[0]), int(data[1])
            new[:, cols] = (originals[u].double() * shares[u][j]).to(w)
        i += 1
    return torch.cat([w, new], dim=1)


def eligible(g: UnitGroup) -> bool:
    """A group that can grow: one producing Conv/Linear, no depthwise or grouped convolutions, every
    member filling its whole dimension, consumers that are plain Conv/Linear, no GroupNorm (with or
    without affine parameters: a unit added there joins a group's mean and variance)."""
    if len(g.producers) != 1 or not all(m.covers for m in g.members) or g.norms:
        return False
    for m in g.members:
        if isinstance(m.module, LAYERS) and (is_depthwise(m.module) or getattr(m.module, "groups", 1) != 1):
            return False
        if m.kind == "in" and not isinstance(m.module, LAYERS):
            return False
        if m.kind == "out" and not isinstance(m.module, LAYERS) and not isinstance(m.module, nn.modules.batchnorm._BatchNorm):
            return False
    return True
