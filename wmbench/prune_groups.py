"""The structured prune attack's channel groups, cached per model structure in the process.

``structured_pruning.channel_groups`` asks torch-pruning for every Conv/Linear's group with all its channels;
on transformers most of a structured prune cell is spent there (one thread: swin_v2_t at 64x64
about 210 s of a 211 s cell, its graph built in 0.15 s; swin_t at 32x32 13 of 15 s; resnet18 none
to speak of). A model of a structure analysed before (a grid's other seeds, strengths and
methods) is given the stored groups bound to its own freshly built dependency graph, whose nodes
are found by name (a module's or parameter's qualified name, an operation's label) and whose edges
by their place among a node's dependencies; the pruning of the chosen channels still runs on that
graph, as before. The key is ``wmbench.structure_key``'s (as ``wmbench.units``' cache): a forward
that couples other channels builds another autograd graph, so it never shares an analysis.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from wmbench.lru import lru_get, lru_put
from wmbench.progress import announced_if_slow
from wmbench.structure_key import structure_key


Indices = Tensor | tuple[Any, ...]  # int64 where every entry is a Python int (8 bytes each, not 36), else as found


def _packed(values: list[Any]) -> Indices:
    return torch.tensor(values, dtype=torch.long) if all(type(v) is int for v in values) else tuple(values)


def _unpacked(values: Indices) -> list[Any]:
    return values.tolist() if isinstance(values, Tensor) else list(values)


@dataclass(frozen=True)
class StoredItem:
    """One (dependency, indices) entry of a group, by names. ``edge`` is the dependency's place in
    node ``source``'s dependencies; None for the group's root, whose dependency torch-pruning makes
    from ``handler`` on the node itself. ``target``: the dependency's target node; ``pruning``: its
    trigger's and handler's pruner classes and methods (all checked when bound)."""

    source: str
    edge: int | None
    target: str
    pruning: tuple[str, str]
    idxs: Indices
    root_idxs: Indices
    handler: Callable[..., Any] | None = None  # the root's: a method of one of torch-pruning's shared pruners


Stored = tuple[int, list[list[StoredItem]]]  # groups skipped, the groups

CACHE_SIZE = 16  # structures kept, least recently used dropped
_CACHE: OrderedDict[str, Stored] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def analysed_groups(model: nn.Module, example: Tensor) -> tuple[Any, list[Any], int]:
    """torch-pruning's dependency graph of ``model`` (in eval mode, ``example`` on its device), its
    channel groups as ``structured_pruning.channel_groups`` finds them and the number skipped; the groups are
    served from the cache where a model of the same structure was analysed."""
    from wmbench import structured_pruning

    key = structure_key(model, example)
    stored = lru_get(_CACHE, _CACHE_LOCK, key[0]) if key is not None else None
    classifier = structured_pruning.output_layers(model, example) if stored is None else None
    graph = structured_pruning.dependency_graph(model, example)
    if stored is not None:
        groups = _bind(stored[1], graph)
        if groups is not None:
            return graph, groups, stored[0]
        classifier = structured_pruning.output_layers(model, example)
    with announced_if_slow(f"the channel groups of {type(model).__name__}", cached=key is not None):
        groups, skipped = structured_pruning.channel_groups(graph, classifier)
    names = {id(m): n for n, m in model.named_modules()}
    if key is not None and tuple(names.get(id(m), "?") for m in classifier) == key[1]:
        portable = _portable(groups, graph)
        if portable is not None:
            lru_put(_CACHE, _CACHE_LOCK, key[0], (skipped, portable), CACHE_SIZE)
    return graph, groups, skipped


def _labeller(graph: Any) -> Callable[[Any], str]:
    """A node's name in ``graph``: a module's qualified name; a bare parameter's (torch-pruning
    numbers those in an order of ids, ``UnwrappedParameter_6``, which another model need not
    share); an operation's label (its kind and its place in the trace, ``_ElementWiseOp_12(AddBackward0)``)."""
    parameters = {id(p): name for name, p in graph.model.named_parameters()}

    def label(node: Any) -> str:
        if isinstance(node.module, nn.Parameter):
            return f"parameter {parameters.get(id(node.module), node._name)}"
        return node._name if node._name is not None else str(node.module)

    return label


def _pruning(dep: Any) -> tuple[str, str]:
    """A dependency's trigger and handler by their pruner class and method names."""
    def name(fn: Callable[..., Any]) -> str:
        return f"{type(getattr(fn, '__self__', None)).__qualname__}.{getattr(fn, '__name__', '?')}"

    return name(dep.trigger), name(dep.handler)


def _portable(groups: list[Any], graph: Any) -> list[list[StoredItem]] | None:
    """``groups`` by names; None where a node's name is not unique or a dependency is not found
    among its source's (nothing is stored then)."""
    label = _labeller(graph)
    labels = [label(n) for n in graph.module2node.values()]
    if len(set(labels)) != len(labels):
        return None
    portable = []
    for group in groups:
        items = []
        for i, item in enumerate(group):
            dep = item.dep
            if i == 0:
                if dep.source is not dep.target or dep.trigger is not dep.handler:
                    return None
                edge, handler = None, dep.handler
            else:
                found = [k for k, d in enumerate(dep.source.dependencies) if d is dep]
                if len(found) != 1:
                    return None
                edge, handler = found[0], None
            items.append(StoredItem(label(dep.source), edge, label(dep.target), _pruning(dep),
                                    _packed(item.idxs), _packed(item.root_idxs), handler))
        portable.append(items)
    return portable


def _bind(portable: list[list[StoredItem]], graph: Any) -> list[Any] | None:
    """The stored groups made of ``graph``'s own nodes and dependencies (fresh index lists); None
    where a node, dependency or handler does not match what was stored."""
    from torch_pruning.dependency import Dependency, Group

    label = _labeller(graph)
    nodes = {label(n): n for n in graph.module2node.values()}
    groups = []
    for items in portable:
        group = Group()
        group._DG = graph
        for item in items:
            source = nodes.get(item.source)
            if source is None:
                return None
            if item.edge is None:
                if item.handler is None or not graph.is_out_channel_pruning_fn(item.handler):
                    return None
                dep = Dependency(item.handler, item.handler, source=source, target=source)
            elif item.edge < len(source.dependencies):
                dep = source.dependencies[item.edge]
            else:
                return None
            if label(dep.target) != item.target or _pruning(dep) != item.pruning:
                return None
            group.add_dep(dep, _unpacked(item.idxs))
            group[len(group) - 1].root_idxs = _unpacked(item.root_idxs)  # as torch-pruning's get_pruning_group sets them
        groups.append(group)
    return groups


