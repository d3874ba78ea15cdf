"""Structured pruning through torch-pruning's dependency graph: the model's channel groups (each
Conv/Linear output with everything coupled to it), the classifier left out, an L1 importance per
channel, and the chosen channels removed or zeroed in place (``Prune`` with ``mode: structured``,
``attacks/pruning.py``); the graph and groups are also what ``wmbench.units`` (permute, resync) and
``wmbench.prune_groups`` build on."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from wmbench.errors import NotApplicable
from wmbench.models import forward_calls
from wmbench.prune_groups import analysed_groups
from wmbench.warn_once import warn_once

log = logging.getLogger(__name__)


OUTPUT_KINDS = (nn.Conv2d, nn.Linear)


def output_layers(model: nn.Module, example: Tensor) -> list[nn.Module]:
    """The Conv/Linear modules whose output is the model's output (the classifier), by a forward hook;
    when the output is computed from them (``head(x) * scale``), the last Conv/Linear to run."""
    out, ran = forward_calls(model, example, OUTPUT_KINDS)  # the outputs themselves: an id alone can be reused
    return classifier_of(model, out, ran)


def classifier_of(model: nn.Module, out: Any, ran: list[tuple[nn.Module, Any]]) -> list[nn.Module]:
    """``output_layers``' choice from a forward's output and, in call order, the OUTPUT_KINDS
    modules that ran with their outputs."""
    flat = out if isinstance(out, (tuple, list)) else [out]
    found = [mod for o in flat for mod, t in ran if t is o]
    return found or [mod for mod, _ in ran[-1:]] or [m for m in model.modules() if isinstance(m, OUTPUT_KINDS)][-1:]


class Pruned(NamedTuple):
    """What ``structured_prune`` left: groups torch-pruning could not analyse (``skipped``), groups
    coupled through a layer used outside its forward (``untraced``), and the groups in all."""

    skipped: int
    untraced: int
    total: int


def structured_prune(model: nn.Module, fraction: float, scope: str, remove: bool, example: Tensor, untraced: list[str]) -> Pruned:
    """Zero (or, with ``remove``, physically remove) a ``fraction`` of the output channels by L1 norm.
    ``untraced``: the layers used outside their forward (``untraced_layers.layers_used_outside_forward``,
    found before the model changes): a group whose channels reach one of them is left unpruned
    (``untraced_groups``)."""
    import torch_pruning as tp

    device = next(model.parameters()).device
    example = example.to(device)
    was_training = model.training
    model.eval()  # tracing runs a forward: keep the BN running statistics as they are
    try:
        graph, groups, skipped = analysed_groups(model, example)  # output_layers, dependency_graph, channel_groups
        importance = tp.importance.MagnitudeImportance(p=1)
        if skipped:
            warn_once(log, f"prune: {skipped} of {len(groups) + skipped} channel groups of {type(model).__name__} "
                      "left unpruned (torch-pruning cannot analyse them)")
        coupled = untraced_groups(graph, groups, {id(p) for name in untraced for p in model.get_submodule(name).parameters()})
        groups = [g for g, bad in zip(groups, coupled) if not bad]
        scores = [importance(g).float().cpu() for g in groups]
        chosen = _choose(scores, fraction, scope)
        for group, idxs in zip(groups, chosen):
            if not idxs:
                continue
            root = group[0].dep
            pruned = graph.get_pruning_group(root.target.module, root.handler, idxs)
            if remove:
                try:
                    pruned.prune()
                except Exception as exc:  # noqa: BLE001 - torch-pruning's index bookkeeping fails on some graphs
                    raise NotApplicable(
                        f"torch-pruning cannot remove channels of {type(model).__name__} ({type(exc).__name__}: "
                        f"{exc}); use remove: false"
                    ) from None
            else:
                _zero_group(graph, pruned, group, type(model).__name__)
        if remove:
            try:
                with torch.no_grad():
                    model(example)
            except Exception as exc:  # noqa: BLE001 - any failure: the removal broke the model
                raise NotApplicable(
                    f"removing channels broke {type(model).__name__} ({type(exc).__name__}: {exc}); "
                    "torch-pruning does not track all of its layers: use remove: false"
                ) from None
    finally:
        model.train(was_training)
    return Pruned(skipped, sum(coupled), len(groups) + skipped + sum(coupled))


def untraced_groups(graph: Any, groups: list[Any], weights: set[int]) -> list[bool]:
    """Per group, whether its channels reach a tensor in ``weights`` (ids: the parameters of layers
    used outside their forward): a node of the group is that parameter, or an operation of the
    trace that reads it (through autograd functions of no other node: ``F.linear(x, layer.weight)``
    is an ``AddmmBackward0`` node reading the weight through a ``TBackward0``). torch-pruning reads
    such an operation as element-wise, coupling the channels on its two sides index by index: it
    prunes the wrong input columns after it (or fails on an index past their end) and never the
    layer's own. Such a group is left unpruned."""
    if not weights:
        return [False] * len(groups)
    nodes = list(graph.module2node.values())
    own = {node.grad_fn for node in nodes if getattr(node, "grad_fn", None) is not None}
    reading: set[int] = set()
    for node in nodes:
        if id(node.module) in weights or _reads(getattr(node, "grad_fn", None), own, weights):
            reading.add(id(node))
    return [any(id(dep.target) in reading or id(dep.source) in reading for dep, _ in group) for group in groups]


def _reads(fn: Any, own: set[Any], weights: set[int]) -> bool:
    """Whether autograd function ``fn`` takes a tensor in ``weights``, directly or through functions
    not in ``own`` (those of the graph's other nodes)."""
    stack, seen = [fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if id(getattr(f, "variable", None)) in weights:
            return True
        stack.extend(g for g, _ in f.next_functions if g is not None and g not in own)
    return False


# Most index entries one reshape mapping of a group may produce: far above what a real
# conv -> flatten -> linear needs (channels x spatial positions), far below an exploding chain.
INDEX_LIMIT = 4_000_000


class _IndexBlowup(Exception):
    """torch-pruning's index mapping for one group grew past INDEX_LIMIT."""


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def bounded_index_mapping(limit: int | None = None) -> Iterator[None]:
    """Within the block, torch-pruning's flatten index mapping raises _IndexBlowup instead of
    building more than ``limit`` (default INDEX_LIMIT) indices; a no-op on torch-pruning versions
    without that class."""
    from torch_pruning.dependency import index_mapping

    limit = INDEX_LIMIT if limit is None else limit

    cls = getattr(index_mapping, "_FlattenIndexMapping", None)
    if cls is None:
        yield
        return
    original = cls.__call__

    def bounded(self, idxs):  # type: ignore[no-untyped-def]
        if not getattr(self, "reverse", True) and len(idxs) * int(getattr(self, "_stride", 1)) > limit:
            raise _IndexBlowup(f"{len(idxs)} indices x stride {self._stride}")
        return original(self, idxs)

    with _PATCH_LOCK:
        cls.__call__ = bounded
        try:
            yield
        finally:
            cls.__call__ = original


def dependency_graph(model: nn.Module, example: Tensor) -> Any:
    """torch-pruning's dependency graph of ``model`` traced on ``example``; NotApplicable where its
    tracer fails (ShuffleNetV2's channel shuffle: ZeroDivisionError), for every attack that uses it.
    It traces through autograd, so frozen parameters (``requires_grad`` off) are made trainable
    while it traces: else a frozen layer fed by the input is missing from the graph, and permute,
    structured pruning, dummy_neurons and resync would leave it in place without a word."""
    import torch_pruning as tp

    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        with torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as exc:  # noqa: BLE001 - torch-pruning's tracer fails in many ways
        raise NotApplicable(f"torch-pruning cannot trace {type(model).__name__} ({type(exc).__name__}: {exc})") from None
    finally:
        for p in frozen:
            p.requires_grad_(False)


def channel_groups(graph: Any, ignored: list[nn.Module]) -> tuple[list[Any], int]:
    """torch-pruning's ``get_all_groups`` (every Conv/Linear's output channels as a root, each layer in
    one group), except that a group whose analysis fails or explodes is skipped, not fatal.
    Returns (groups, number skipped)."""
    ignored = list(ignored) + list(getattr(graph, "IGNORED_LAYERS_IN_TRACING", []))
    visited: set[int] = set()
    groups, skipped = [], 0
    with bounded_index_mapping():
        for module in list(graph.module2node):
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or any(module is m for m in ignored):
                continue
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or pruner.get_out_channels(module) is None or id(module) in visited:
                continue
            try:
                group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
            except (_IndexBlowup, RuntimeError, ValueError, IndexError) as exc:
                log.debug("prune: group rooted at %s skipped: %s", type(module).__name__, exc)
                skipped += 1
                continue
            prunable = True
            for dep, _ in group:
                if graph.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    prunable = prunable and not any(dep.target.module is m for m in ignored)
            if prunable:
                groups.append(group)
    return groups, skipped


def _choose(scores: list[Tensor], fraction: float, scope: str) -> list[list[int]]:
    """Indices to prune in each group: the lowest scores, per group or globally; one channel always stays."""
    if scope == "layer":
        out = []
        for s in scores:
            k = min(round(fraction * len(s)), len(s) - 1)
            out.append(sorted(torch.argsort(s)[:k].tolist()))
        return out
    guarded = []
    for s in scores:
        s = s.clone()
        s[s.argmax()] = float("inf")  # the strongest channel of every group survives
        guarded.append(s)
    flat = torch.cat(guarded)
    k = min(round(fraction * len(flat)), len(flat) - len(scores))
    drop = torch.zeros(len(flat), dtype=torch.bool)
    drop[torch.argsort(flat, stable=True)[:k]] = True
    out, offset = [], 0
    for s in scores:
        out.append(drop[offset : offset + len(s)].nonzero().flatten().tolist())
        offset += len(s)
    return out


def _zero_attention_channels(attention: nn.MultiheadAttention, idx: Tensor) -> None:
    """Zero what torch-pruning removes with embedding channels ``idx`` of an attention layer: those
    rows of the query, key and value projections and their columns, the output projection's rows
    and columns, and the matching biases."""
    out = attention.out_proj
    idx = idx.to(out.weight.device)  # a module's parameters share one device
    e = attention.embed_dim
    rows = torch.cat([idx, idx + e, idx + 2 * e])
    if attention.in_proj_weight is not None:
        attention.in_proj_weight[rows] = 0.0
        attention.in_proj_weight[:, idx] = 0.0
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        p = getattr(attention, name)
        if p is not None:
            p[idx] = 0.0
    if attention.in_proj_bias is not None:
        attention.in_proj_bias[rows] = 0.0
    for p in (attention.bias_k, attention.bias_v):
        if p is not None:
            p[..., idx] = 0.0
    out.weight[idx] = 0.0
    out.weight[:, idx] = 0.0
    if out.bias is not None:
        out.bias[idx] = 0.0


def _parameter_indices(group: Any) -> dict[int, list[int]]:
    """Each bare parameter's indices in ``group`` (by id): all it has in the group's channels."""
    found: dict[int, set[int]] = {}
    for dep, idxs in group:
        if isinstance(dep.target.module, nn.Parameter):
            found.setdefault(id(dep.target.module), set()).update(idxs)
    return {key: sorted(idxs) for key, idxs in found.items()}


@torch.no_grad()
def _zero_group(graph: Any, group: Any, full: Any, model_name: str = "the model") -> None:
    """Zero, keeping shapes, what pruning ``group`` would remove: output rows of Conv/Linear (and
    their bias), BN/affine entries, the consumers' input channels, an attention layer's embedding
    channels and a bare parameter's entries (ViT's tokens, ConvNeXt's layer_scale). A bare
    parameter's dimension is chosen as permute chooses it (``units.parameter_dim``), from its
    indices in ``full``, the group with all its channels, and torch-pruning's dimension for it in
    this graph (its node's, never its shared pruner's, which the last graph to use it set): a
    parameter with no dimension for them (Swin's relative position bias tables, one entry per
    head) is left as it is."""
    from wmbench.units import parameter_dim

    extents = _parameter_indices(full)
    for dep, idxs in group:
        module, idx = dep.target.module, torch.as_tensor(idxs, dtype=torch.long)
        if len(idx) == 0:
            continue
        if isinstance(module, nn.Parameter):  # a bare parameter (ViT's class token, position embedding, ConvNeXt's layer_scale)
            dim = parameter_dim(module, dep.target.pruning_dim, extents.get(id(module), []))
            if dim is not None and module.shape[dim] > int(idx.max()):
                module.index_fill_(dim, idx.to(module.device), 0.0)
            else:
                warn_once(log, f"prune: a parameter of shape {tuple(module.shape)} in {model_name} has no dimension of its channels: left as it is")
            continue
        if isinstance(module, nn.MultiheadAttention):
            _zero_attention_channels(module, idx)
            continue
        if not isinstance(module, nn.Module):
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(module, "transposed", False):
            groups = getattr(module, "groups", 1)
            depthwise = groups > 1 and groups == module.weight.shape[0]
            if out or depthwise:
                module.weight[idx.to(module.weight.device)] = 0.0
                if module.bias is not None and out:
                    module.bias[idx.to(module.bias.device)] = 0.0
            elif groups == 1:
                module.weight[:, idx.to(module.weight.device)] = 0.0
            else:
                warn_once(log, f"prune: input channels of grouped {type(module).__name__} layers of {model_name} are left as they are")
        elif out:  # BatchNorm, LayerNorm, PReLU...: zero the channel's affine parameters
            for name in ("weight", "bias"):
                p = getattr(module, name, None)
                if isinstance(p, Tensor) and p.dim() == 1 and len(p) > int(idx.max()):
                    p[idx.to(p.device)] = 0.0
