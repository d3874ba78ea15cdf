"""A digest of a model's traced structure: what torch-pruning's dependency analysis of it reads.

``structure_key(model, example)`` runs one forward on ``example`` with gradients and hashes the
autograd graph (node types, saved arguments, edges, each leaf by its parameter's name), the modules
called and the graph node each returned, the parameters' and buffers' names, shapes and dtypes, the
``repr`` and the example's shape. Two models with one key are analysed alike, so ``wmbench.units``
caches its unit groups under it, and ``wmbench.prune_groups`` structured pruning's channel groups. A forward that couples other channels through an attribute the
``repr`` does not show (a residual flag) builds another graph, so it gets another key.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def structure_key(model: nn.Module, example: Tensor) -> tuple[str, tuple[str, ...]] | None:
    """A digest of everything the analysis reads, and the classifier's names (as ``output_layers``
    picks them); None where the forward fails (the analysis then runs, and fails, as before).

    One forward on ``example`` with gradients (frozen parameters made trainable, as
    ``dependency_graph`` traces), hooks on every module. The digest covers the example's shape,
    dtype and device; the model's ``repr``, each module's name and class, each parameter's and
    buffer's name, shape and dtype; the autograd graph from the outputs (each node's type, its
    saved non-tensor arguments and saved tensors' shapes and dtypes, its edges, each leaf by its
    parameter's name); the modules called, in order, with the graph node of each tensor they
    returned (torch-pruning's module-to-node map); the output's structure; the classifier; and
    ``INDEX_LIMIT``. A forward whose path depends on an attribute that ``repr`` does not show
    changes the graph, so it changes the key."""
    calls: list[tuple[nn.Module, Any]] = []
    frozen = [p for p in model.parameters() if not p.requires_grad]
    hooks = []
    try:
        with torch.enable_grad():
            for m in model.modules():
                hooks.append(m.register_forward_hook(lambda mod, _i, out: calls.append((mod, out))))
            for p in frozen:
                p.requires_grad_(True)
            out = model(example)
    except Exception:  # noqa: BLE001 - no key: the analysis runs and reports as it always did
        return None
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    try:
        return _digest(model, example, out, calls)
    except Exception:  # noqa: BLE001 - an autograd graph this walk cannot read: no key, the analysis runs
        log.debug("structure_key: no key for %s (its analyses are not cached)", type(model).__name__, exc_info=True)
        return None


def _digest(model: nn.Module, example: Tensor, out: Any, calls: list[tuple[nn.Module, Any]]) -> tuple[str, tuple[str, ...]]:
    """``structure_key``'s digest of one forward: its output ``out`` and the module ``calls``."""
    from wmbench import structured_pruning

    params = {id(p): n for n, p in model.named_parameters()}
    modules = {id(m): n for n, m in model.named_modules()}
    index: dict[Any, int] = {}
    queue: list[Any] = []

    def node(fn: Any) -> int | None:
        if fn is None:
            return None
        if fn not in index:
            index[fn] = len(queue)
            queue.append(fn)
        return index[fn]

    def describe(value: Any) -> Any:
        if isinstance(value, Tensor):
            return ("tensor", tuple(value.shape), str(value.dtype), node(value.grad_fn), value.output_nr if value.grad_fn is not None else None)
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(describe(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((repr(k), describe(v)) for k, v in value.items()))
        return type(value).__name__

    outputs = describe(out)  # numbers the output nodes first
    graph = []
    done = 0
    while done < len(queue):  # breadth first from the outputs: every node reached, numbered in a fixed order
        fn = queue[done]
        done += 1
        variable = getattr(fn, "variable", None)
        leaf = (params.get(id(variable)), tuple(variable.shape), str(variable.dtype)) if isinstance(variable, Tensor) else None
        edges = tuple((node(f), nr) for f, nr in fn.next_functions)
        name = fn.name() if hasattr(fn, "name") else None
        graph.append((f"{type(fn).__module__}.{type(fn).__qualname__}", name, leaf, _saved(fn), edges))
    called = [(modules.get(id(mod), "?"), _calls_of(value, index)) for mod, value in calls]
    classifier = tuple(modules.get(id(m), "?") for m in structured_pruning.classifier_of(model, out, [(m, o) for m, o in calls if isinstance(m, structured_pruning.OUTPUT_KINDS)]))
    key = (
        (tuple(example.shape), str(example.dtype), example.device.type),
        repr(model),
        [(n, f"{type(m).__module__}.{type(m).__qualname__}") for n, m in model.named_modules()],
        [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
        [(n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers()],
        graph, called, outputs, classifier, structured_pruning.INDEX_LIMIT,
    )
    return hashlib.sha256(repr(key).encode()).hexdigest(), classifier


_SAVED: dict[type, list[str]] = {}  # per autograd node type, its saved-argument attributes


def _saved(fn: Any) -> tuple:  # type: ignore[type-arg]
    """An autograd node's saved arguments: values as they are, tensors by shape and dtype."""
    attrs = _SAVED.get(type(fn))
    if attrs is None:
        attrs = _SAVED[type(fn)] = [a for a in dir(fn) if a.startswith("_saved_")]
    found = []
    for attr in attrs:
        try:
            value = getattr(fn, attr)
        except Exception as exc:  # noqa: BLE001 - an argument that cannot be read: its error stands for it
            value = type(exc).__name__
        found.append((attr, _plain(value)))
    return tuple(found)


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return repr(value)


def _calls_of(value: Any, index: dict[Any, int]) -> Any:
    """A module's output by the graph nodes of its tensors (-1: a node the outputs do not reach)."""
    if isinstance(value, Tensor):
        fn = value.grad_fn
        return (index.get(fn, -1) if fn is not None else None, value.output_nr, tuple(value.shape))
    if isinstance(value, (tuple, list)):
        return tuple(_calls_of(v, index) for v in value)
    if isinstance(value, dict):
        return tuple((repr(k), _calls_of(v, index)) for k, v in value.items())
    return type(value).__name__
