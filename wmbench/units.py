"""Permutable unit groups: the channels that must move together for a model's function to stay the same.

Found with torch-pruning's DependencyGraph, through the same group analysis the structured prune
attack uses (``wmbench.structured_pruning.channel_groups``): a group is rooted at a Conv/Linear's output
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
moves a channel into another of its groups changes the function, so
``wmbench.norm_permutation.draw_permutation`` draws one that maps its groups onto its groups
(blocks, then within them); every other group's permutation is the plain ``torch.randperm`` it
always was.

The analysis is cached in the process (the ``CACHE_SIZE`` structures used last), under
``wmbench.structure_key`` (one forward with gradients, a fraction of the analysis: on one thread,
resnet18 at 32x32 about 0.015 of 0.05 s, swin_t at 64x64 0.1 of 20 s): a model of the same
structure (a grid's other seeds and strengths, resync's reference and suspect) is given the stored
groups bound to its own modules by their qualified names (fresh Members, copied positions).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from torch import Tensor, nn

from wmbench.lru import lru_get, lru_put
from wmbench.progress import announced_if_slow
from wmbench.structure_key import structure_key

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
    torch-pruning cannot analyse, or with grouped non-depthwise convolutions); served from the
    cache where a model of the same structure was analysed (see the module docstring)."""
    was_training = model.training
    model.eval()
    try:
        example = example.to(next(model.parameters()).device)
        key = structure_key(model, example)
        if key is not None:
            found = _cached(key[0], model)
            if found is not None:
                return found
        with announced_if_slow(f"the dependency graph of {type(model).__name__}", cached=key is not None):
            groups, skipped, classifier = _analyse(model, example)
    finally:
        model.train(was_training)
    names = {id(m): n for n, m in model.named_modules()}
    if key is not None and tuple(names.get(id(m), "?") for m in classifier) == key[1]:
        _store(key[0], groups, skipped, names)
    return groups, skipped


def _analyse(model: nn.Module, example: Tensor) -> tuple[list[UnitGroup], int, list[nn.Module]]:
    """The groups, the count skipped and the classifier layers, by torch-pruning's analysis (the
    model in eval mode, ``example`` on its device)."""
    from wmbench.structured_pruning import channel_groups, dependency_graph, output_layers

    names = {id(m): n for n, m in model.named_modules()}
    owners = _parameter_owners(model)
    classifier = output_layers(model, example)
    graph = dependency_graph(model, example)  # NotApplicable where torch-pruning cannot trace
    raw, skipped = channel_groups(graph, classifier)
    groups = []
    for group in raw:
        built = _group(graph, group, names, owners)
        if built is None:
            skipped += 1
        else:
            groups.append(built)
    return groups, skipped, classifier


CACHE_SIZE = 16  # analyses kept, least recently used dropped (per architecture: the attack and resync example sizes, each grown shape)
_CACHE: OrderedDict[str, tuple[int, list[tuple[list[tuple], list[Norm]]]]] = OrderedDict()  # type: ignore[type-arg]
_CACHE_LOCK = threading.Lock()


def _store(key: str, groups: list[UnitGroup], skipped: int, names: dict[int, str]) -> None:
    """Keep ``groups`` by names: each member's (name, its module's qualified name, kind, tensor, dim,
    positions, tensor names, size), never the modules."""
    portable = []
    for g in groups:
        members = []
        for m in g.members:
            if id(m.module) not in names:
                return
            members.append((m.name, names[id(m.module)], m.kind, m.tensor, m.dim, m.pos.clone(), list(m.names), m.size))
        portable.append((members, [Norm(n.name, n.groups, n.channels, n.pos.clone()) for n in g.norms]))
    lru_put(_CACHE, _CACHE_LOCK, key, (skipped, portable), CACHE_SIZE)


def _cached(key: str, model: nn.Module) -> tuple[list[UnitGroup], int] | None:
    """The stored groups of ``key`` bound to ``model``'s modules (fresh Members, copied positions);
    None where there are none or a member's tensors do not match what was stored."""
    found = lru_get(_CACHE, _CACHE_LOCK, key)
    if found is None:
        return None
    skipped, portable = found
    groups = []
    try:
        for members, norms in portable:
            bound = []
            for name, path, kind, tensor, dim, pos, tensor_names, size in members:
                member = Member(name, model.get_submodule(path), kind, pos.clone(), tensor, dim)
                if member.names != tensor_names or member.size != size:
                    return None
                bound.append(member)
            groups.append(UnitGroup(bound, [Norm(n.name, n.groups, n.channels, n.pos.clone()) for n in norms]))
    except (AttributeError, IndexError):  # no such module (get_submodule), or no such dimension
        return None
    return groups, skipped


Slot = tuple[str, nn.Module, Kind, str | None, int | None]  # a Member's name, module, kind, tensor, dim
Owner = tuple[str, nn.Module, str]  # a parameter's full name, the module holding it, its name there


def _parameter_owners(model: nn.Module) -> dict[int, Owner]:
    """Each parameter's Owner, by id."""
    return {id(p): (f"{prefix}.{leaf}" if prefix else leaf, m, leaf)
            for prefix, m in model.named_modules() for leaf, p in m.named_parameters(recurse=False)}


def parameter_dim(p: Tensor, dim: int | None, idxs: list[int]) -> int | None:
    """The dimension of bare parameter ``p`` that a group's indices ``idxs`` (all it has in the
    group) run along: torch-pruning's ``dim`` for it (its graph node's: its last non-singleton
    one) where it is long enough, else the one dimension exactly as long as the indices are many
    (a (1, C, H, W) position map on C > W channels: C); None where there is none or more than
    one (Swin's (169, heads) relative position bias tables, which torch-pruning couples to the
    residual stream)."""
    if p.dim() == 0 or not idxs:
        return None
    if dim is not None and -p.dim() <= dim < p.dim() and p.shape[dim] > max(idxs):
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
        dim = parameter_dim(target, node.pruning_dim, idxs)
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
        pos = _by_unit(idxs, roots)
        if pos is None:
            return None
        if n_units is None:
            n_units = int(pos.shape[0])
        if pos.shape[0] != n_units:
            return None
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
    pos = _by_unit(idxs, roots)
    if pos is None or max(idxs) >= norm.num_channels:
        return None
    return Norm(name, norm.num_groups, norm.num_channels, pos)


def _by_unit(idxs: list[int], roots: list[int]) -> Tensor | None:
    """The indices ``idxs`` arranged by the unit (root index) each belongs to: (units, k), in their
    order within a unit; None where the units do not hold equally many."""
    units = max(roots) + 1
    counts = torch.bincount(torch.tensor(roots), minlength=units)
    if bool((counts != counts[0]).any()):
        return None
    order = torch.argsort(torch.tensor(roots), stable=True)
    return torch.tensor(idxs)[order].view(units, -1)


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


class Snapshot:
    """The parameters and buffers of a unit group's modules (and of ``extra`` ones), to put back
    where rewriting the group changed the model's function: resync's matching, dummy_neurons'
    growth. ``copy_values``: keep a copy of their values too, for a rewrite that may write in place
    (resync's rescaling); without it the tensors themselves are kept, for one that only replaces
    them (``assign``)."""

    def __init__(self, group: UnitGroup, extra: Iterable[nn.Module] = (), copy_values: bool = True) -> None:
        modules = {id(m): m for m in [*(member.module for member in group.members), *extra]}
        self.saved = [
            (module, {name: (t, t.detach().clone() if copy_values else None) for name, t in [*module._parameters.items(), *module._buffers.items()] if t is not None})
            for module in modules.values()
        ]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every kept tensor back in its module (with its kept values, where copied) and the
        modules' sizes (``refresh_shape``)."""
        for module, tensors in self.saved:
            for name, (tensor, values) in tensors.items():
                if values is not None:
                    tensor.copy_(values)
                (module._parameters if name in module._parameters else module._buffers)[name] = tensor
            refresh_shape(module)
