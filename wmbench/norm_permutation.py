"""Random permutations of a unit group that keep every GroupNorm on it working on the same channels.

A GroupNorm(G, C) with 1 < G < C normalises each of its groups over that group's channels: a
permutation that moves a channel into another group changes the function. ``draw_permutation``
maps groups onto groups (whole blocks, then the channels within them); a group with no such
GroupNorm gets the plain ``torch.randperm`` (``wmbench.units`` records the GroupNorms, ``Norm``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wmbench.units import UnitGroup


def draw_permutation(group: UnitGroup, rng: torch.Generator) -> Tensor:
    """A random permutation of ``group``'s units (as ``permute_group`` takes it) that keeps the
    function: ``torch.randperm`` where no GroupNorm with several multi-channel groups is on the
    group; else one mapping each such GroupNorm's groups onto its groups. The units are split into
    blocks, the smallest sets closed under "in one group of some GroupNorm" (a GroupNorm's groups;
    with several GroupNorms of other group counts, their coarsest common structure), and within
    them into cells, the units in the same group of every GroupNorm. Blocks of the same layout
    (their units' groups in the same pattern) are shuffled as wholes, j-th unit onto j-th unit
    (only where every GroupNorm's channels are all in the group: a group shared with other
    channels cannot move), then the units within each cell."""
    labels = _norm_labels(group)
    if labels is None:
        return torch.randperm(group.units, generator=rng)
    n = group.units
    cells = torch.unique(labels, dim=0, return_inverse=True)[1]
    parent = list(range(n))

    def root(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    first: dict[int, int] = {}
    for u, row in enumerate(labels.tolist()):
        for value in row:
            v = first.setdefault(value, u)
            parent[root(u)] = root(v)
    blocks: dict[int, list[int]] = {}
    for u in range(n):
        blocks.setdefault(root(u), []).append(u)
    base = torch.arange(n)
    if all(norm.pos.numel() == norm.channels for norm in group.norms if norm.constrains):
        layouts: dict[tuple, list[list[int]]] = {}  # type: ignore[type-arg]
        for units in blocks.values():  # in the order of their first unit
            seen: dict[int, int] = {}
            layout = tuple(tuple(seen.setdefault(v, len(seen)) for v in labels[u].tolist()) for u in units)
            layouts.setdefault(layout, []).append(units)
        for same in layouts.values():
            if len(same) > 1:
                order = torch.randperm(len(same), generator=rng).tolist()
                for new, old in zip(same, order):
                    base[torch.tensor(new)] = torch.tensor(same[old])
    perm = base.clone()
    for cell in range(int(cells.max()) + 1):
        where = (cells == cell).nonzero().flatten()
        if len(where) > 1:
            perm[where] = base[where][torch.randperm(len(where), generator=rng)]
    return perm


def _norm_labels(group: UnitGroup) -> Tensor | None:
    """Per unit, the group of each of its channels in each constraining GroupNorm (numbered apart
    across GroupNorms): (units, k); None where no GroupNorm constrains the group."""
    columns, offset = [], 0
    for norm in group.norms:
        if norm.constrains:
            columns.append(norm.pos // (norm.channels // norm.groups) + offset)
            offset += norm.groups
    return torch.cat(columns, dim=1) if columns else None
