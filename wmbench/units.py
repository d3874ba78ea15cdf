"""Permutable unit groups: the channels that must move together for a model's function to stay the same.

Found with torch-pruning's DependencyGraph, through the same group analysis the structured prune
attack uses (``wmbench.attacks.pruning.channel_groups``): a group is rooted at a Conv/Linear's output
channels and holds everything coupled to them (BatchNorm and LayerNorm entries, depthwise
convolutions, the next layers' input channels, residual partners, squeeze-excitation gates). The
classifier's outputs are never in a group. Shared by the permute and dummy_neurons attacks and by
resynchronised detection.

A transformer's residual stream is one group too: torch-pruning finds the bare parameters on it
(ViT's class token and position embedding, which it detects as "unwrapped" and indexes along their
last non-singleton dimension; where that dimension is too short for the group's channels, along the
one dimension that holds them) and the ``nn.MultiheadAttention`` layers reading from and writing to
it, whose share is their packed input projection's columns and ``out_proj``'s rows (the heads
inside are ``wmbench.attention``'s).

A ``nn.GroupNorm`` on a group (affine or not) is recorded with its group count: a permutation that
moves a channel into another of its groups changes the function, so ``draw_permutation`` draws one
that maps its groups onto its groups (blocks, then within them); every other group's permutation is
the plain ``torch.randperm`` it always was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
Kind = Literal["out", "in"]


@dataclass
class Member:
    """One module's share of a group: ``pos[u]`` are the indices, along ``axis`` (by default dim 0
    for ``out``: rows, norm entries, depthwise channels; dim 1 for ``in``: a consumer's input
    columns), of unit ``u``. ``tensor``: the one tensor of ``module`` indexed, where it is not the
    module's own weight (a bare parameter such as ViT's class token, an attention layer's
    ``in_proj_weight``), along ``dim``."""

    name: str
    module: nn.Module
    kind: Kind
    pos: Tensor  # (units, k) long
    tensor: str | None = None
    dim: int | None = None

    def __post_init__(self) -> None:
        self.names = self._tensor_names()  # fixed at analysis time (resizing changes the lengths)
        self.size = int(self.tensors()[0].shape[self.axis]) if self.names else 0

    @property
    def axis(self) -> int:
        """The dimension of the member's tensors that the units index."""
        if self.dim is not None:
            return self.dim
        return 0 if self.kind == "out" else 1

    @property
    def covers(self) -> bool:
        """Whether the group's units fill the whole dimension (no concatenation with other groups)."""
        return self.pos.numel() == self.size

    def _tensor_names(self) -> list[str]:
        """The tensors this member indexes: ``tensor`` where given; for ``out``, the weight, bias and
        every 1-D parameter or buffer of the unit count's length (norm statistics); for ``in``, the weight."""
        m = self.module
        if self.tensor is not None:
            return [self.tensor] if isinstance(getattr(m, self.tensor, None), Tensor) else []
        if self.kind == "in":
            return ["weight"]
        if isinstance(m, LAYERS):
            return ["weight"] + (["bias"] if m.bias is not None else [])
        n = self.pos.numel()
        found = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        return [k for k, t in found if t is not None and t.dim() == 1 and len(t) == n]

    def tensors(self) -> list[Tensor]:
        return [getattr(self.module, k) for k in self.names]


@dataclass
class Norm:
    """A ``nn.GroupNorm`` on a group's channels: ``pos[u]`` its channels of unit ``u`` (as a Member's)."""

    name: str
    groups: int
    channels: int
    pos: Tensor  # (units, k) long

    @property
    def constrains(self) -> bool:
        """Whether it restricts a permutation: more than one group, and groups of more than one channel
        (GroupNorm(1, C) normalises all channels together, GroupNorm(C, C) each on its own)."""
        return 1 < self.groups < self.channels


@dataclass
class UnitGroup:
    """Units sharing one permutation. ``producers`` are the Conv/Linear ``out`` members; ``norms`` the
    GroupNorms on its channels (affine or not: one without parameters is no member)."""

    members: list[Member]
    norms: list[Norm] = field(default_factory=list)

    @property
    def units(self) -> int:
        return int(self.members[0].pos.shape[0])

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.kind == "out" and isinstance(m.module, LAYERS) and not is_depthwise(m.module)]

    @property
    def ident(self) -> frozenset[tuple[str, str]]:
        """The group by its members' names and kinds (the same in a model and its resized copy)."""
        return frozenset((m.name, m.kind) for m in self.members)


def is_depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == module.weight.shape[0] and module.weight.shape[1] == 1


def unit_groups(model: nn.Module, example: Tensor) -> tuple[list[UnitGroup], int]:
    """The permutable groups of ``model`` (in graph order) and how many were skipped (groups
    torch-pruning cannot analyse, or with grouped non-depthwise convolutions)."""
    from wmbench.attacks.pruning import channel_groups, dependency_graph, output_layers

    names = {id(m): n for n, m in model.named_modules()}
    owners = _parameter_owners(model)
    was_training = model.training
    model.eval()
    try:
        example = example.to(next(model.parameters()).device)
        classifier = output_layers(model, example)
        graph = dependency_graph(model, example)  # NotApplicable where torch-pruning cannot trace
        raw, skipped = channel_groups(graph, classifier)
    finally:
        model.train(was_training)
    groups = []
    for group in raw:
        built = _group(graph, group, names, owners)
        if built is None:
            skipped += 1
        else:
            groups.append(built)
    return groups, skipped


Slot = tuple[str, nn.Module, Kind, str | None, int | None]  # a Member's name, module, kind, tensor, dim
Owner = tuple[str, nn.Module, str]  # a parameter's full name, the module holding it, its name there


def _parameter_owners(model: nn.Module) -> dict[int, Owner]:
    """Each parameter's Owner, by id."""
    return {id(p): (f"{prefix}.{leaf}" if prefix else leaf, m, leaf)
            for prefix, m in model.named_modules() for leaf, p in m.named_parameters(recurse=False)}


def _parameter_dim(p: Tensor, dim: int, idxs: list[int]) -> int | None:
    """The dimension of bare parameter ``p`` that a group's indices ``idxs`` run along: torch-pruning's
    ``dim`` (its last non-singleton one) where it is long enough, else the one dimension exactly as
    long as the indices are many and cover (a (1, C, H, W) position map on C > W channels: C);
    None where there is none or more than one."""
    if p.dim() == 0:
        return None
    if p.shape[dim] > max(idxs):
        return dim
    exact = [d for d in range(p.dim()) if p.shape[d] == len(idxs) > max(idxs)]
    return exact[0] if len(exact) == 1 else None


def _slots(node, kind: Kind, names: dict[int, str], owners: dict[int, Owner], idxs: list[int]) -> list[Slot] | None:  # type: ignore[no-untyped-def]
    """The members one torch-pruning dependency target gives (at indices ``idxs``): none for
    stateless modules and for a norm layer's input side, None where the group cannot be permuted
    (transposed or grouped convolutions, an attention layer without a packed input projection, a
    bare parameter with no dimension for the indices)."""
    target = node.module
    if isinstance(target, nn.Parameter):  # a bare parameter, along the dimension torch-pruning gives it
        owner = owners.get(id(target))
        dim = _parameter_dim(target, node.pruning_dim, idxs)
        return None if owner is None or dim is None else [(owner[0], owner[1], "out", owner[2], dim)]
    if not isinstance(target, nn.Module) or id(target) not in names:
        return []
    name = names[id(target)]
    if isinstance(target, nn.MultiheadAttention):  # the embedding it reads and writes: input columns, out_proj's rows
        if target.in_proj_weight is None:
            return None
        return [(name, target, "in", "in_proj_weight", 1), (names[id(target.out_proj)], target.out_proj, "out", None, None)]
    if isinstance(target, LAYERS):
        if getattr(target, "transposed", False) or getattr(target, "groups", 1) > 1 and not is_depthwise(target):
            return None
        return [(name, target, "out" if getattr(target, "groups", 1) > 1 else kind, None, None)]
    if kind == "in" or not any(True for _ in target.parameters(recurse=False)) and not any(True for _ in target.buffers(recurse=False)):
        return []  # stateless modules (activations, pooling) need nothing
    return [(name, target, kind, None, None)]


def _group(graph, group, names: dict[int, str], owners: dict[int, Owner]) -> UnitGroup | None:  # type: ignore[no-untyped-def]
    members: dict[tuple[int, Kind, str | None], Member] = {}
    norms: dict[int, Norm] = {}
    n_units = None
    for item in group:
        dep, idxs, roots = item.dep, list(item.idxs), list(getattr(item, "root_idxs", item.idxs))
        if not idxs:
            continue
        kind: Kind = "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in"
        norm = dep.target.module
        if isinstance(norm, nn.GroupNorm) and id(norm) not in norms and id(norm) in names:
            found_norm = _norm(names[id(norm)], norm, idxs, roots)
            if found_norm is not None:
                norms[id(norm)] = found_norm
        slots = _slots(dep.target, kind, names, owners, idxs)
        if slots is None:
            return None
        slots = [s for s in slots if (id(s[1]), s[2], s[3]) not in members]
        if not slots:
            continue
        units = max(roots) + 1
        counts = torch.bincount(torch.tensor(roots), minlength=units)
        if n_units is None:
            n_units = units
        if units != n_units or bool((counts != counts[0]).any()):
            return None
        order = torch.argsort(torch.tensor(roots), stable=True)
        pos = torch.tensor(idxs)[order].view(units, -1)
        for name, module, k, tensor, dim in slots:
            members[(id(module), k, tensor)] = Member(name, module, k, pos, tensor, dim)
    found = list(members.values())
    if not found or not any(m.kind == "out" and isinstance(m.module, LAYERS) for m in found):
        return None
    for m in found:
        if not m.tensors() or int(m.pos.max()) >= m.size:
            return None
    units = int(found[0].pos.shape[0])
    return UnitGroup(found, [n for n in norms.values() if n.pos.shape[0] == units])


def _norm(name: str, norm: nn.GroupNorm, idxs: list[int], roots: list[int]) -> Norm | None:
    """A GroupNorm's channels by unit, as ``_group`` orders a member's; None where the units do not
    hold equally many of them (the permutation is then drawn as if it were not there, and the
    output check decides)."""
    units = max(roots) + 1
    counts = torch.bincount(torch.tensor(roots), minlength=units)
    if bool((counts != counts[0]).any()) or max(idxs) >= norm.num_channels:
        return None
    order = torch.argsort(torch.tensor(roots), stable=True)
    return Norm(name, norm.num_groups, norm.num_channels, torch.tensor(idxs)[order].view(units, -1))


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


@torch.no_grad()
def permute_group(group: UnitGroup, perm: Tensor) -> None:
    """New unit ``i`` takes old unit ``perm[i]`` in every member (in place)."""
    for m in group.members:
        src = torch.arange(m.size)
        src[m.pos.flatten()] = m.pos[perm].flatten()
        for t in m.tensors():
            t.copy_(t.index_select(m.axis, src.to(t.device)))


def refresh_shape(module: nn.Module) -> None:
    """After resizing a module's tensors: set ``in/out_channels`` (and a depthwise conv's ``groups``),
    ``in/out_features`` or ``num_features`` from them."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.out_channels
        module.out_channels = w.shape[0]
        if depthwise:
            module.groups = module.in_channels = w.shape[0]
        else:
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        stat = module.running_mean if module.running_mean is not None else w
        module.num_features = len(stat)


def assign(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace a module's parameter or buffer ``name`` by ``value`` (any shape)."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = value
