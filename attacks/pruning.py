"""Magnitude pruning: the smallest weights (unstructured) or output channels (structured) are zeroed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from wmbench.api import Attack, AttackContext
from wmbench.liveness import live_map, live_share_note
from wmbench.models import weight_params
from wmbench.registry import ATTACKS
from wmbench.structured_pruning import Pruned, structured_prune
from wmbench.untraced_layers import layers_used_outside_forward


@ATTACKS.register("prune")
@dataclass(frozen=True)
class Prune(Attack):
    """Magnitude pruning; ``strength`` is the fraction (0..1) of weights or channels pruned.

    - ``unstructured``: the weights of smallest |w| in each Conv/Linear weight tensor (``scope:
      layer``, the default) or among all of them together (``global``) are set to zero. The
      per-layer default is NNWTestbed's ``prune_model_l1_unstructured`` (Attacks/pruning.py:
      ``torch.nn.utils.prune.l1_unstructured`` on every Conv2d and Linear weight) and WRT's
      ``WeightPruning`` (wrt/attacks/removal/weight_pruning.py: the ``sparsity`` share of each
      state-dict tensor, BatchNorm entries skipped; WRT also prunes biases and rounds up, wmbench
      prunes weights only and rounds to nearest). ``global`` is torch's ``global_unstructured``.
      Weights of equal magnitude at the cut are zeroed lowest index first, each tensor read
      row-major and, for ``global``, the tensors in definition order (``weight_params``;
      ``zero_smallest``, version 2: version 1 left that choice to ``torch.topk``, so a row could
      differ between the CPU and CUDA).
    - ``structured``: output channels/neurons with the smallest L1 norm are zeroed, together with
      everything torch-pruning's DependencyGraph couples to them (BN entries, consumers' input
      channels, residual partners); the importance is torch-pruning's ``MagnitudeImportance(p=1)``
      with its defaults: the L1 norms of every coupled slice (the filter, its BatchNorm's weight,
      the consumers' input channels), each layer's divided by their mean, averaged over the group;
      not the filter's own L1 norm alone, the paper's criterion. Ranked in each coupled group (``layer``, the default) or over all groups (``global``); every group keeps at
      least one channel and the final classifier's outputs are never pruned. ``remove: true``
      physically removes the channels instead (shapes change: position-keyed detection then
      reports NotApplicable).
      A group whose analysis torch-pruning cannot complete (it raises, or its index mapping
      explodes: torch-pruning reads reshapes as channel-first flattens, and in channels-last models
      such as swin_t a chain of window reshapes multiplies the indices without bound) is left
      unpruned; how many is logged (once) and written to ``detect_note``. A model torch-pruning
      cannot trace (ShuffleNetV2), or whose channels it cannot remove or whose forward pass fails
      after removal (RegNet with ``remove``; layers used through ``F.linear``), is not applicable:
      the row has no measurements and ``detect_note`` says why. The group analysis is kept per
      model structure in the process (``wmbench.prune_groups``): a grid's other seeds, strengths
      and methods prune from it, with the same result.
      Attention models: an ``nn.MultiheadAttention`` (ViT) loses the pruned embedding channels
      (q/k/v input columns, ``out_proj`` rows), as do the class token and position embedding;
      heads are never pruned. A bare parameter is zeroed along the dimension that holds its
      channels in the model's own graph (``units.parameter_dim``), or left as it is, with a
      warning, where none does. A Conv/Linear layer whose weight is used outside its forward
      (``F.linear(x, layer.weight)``: ``untraced_layers.layers_used_outside_forward``) is not in
      torch-pruning's graph, so its channels stay as they are, and torch-pruning reads the
      product through it as an element-wise operation, coupling the channels on either side
      index by index (it zeroed the wrong columns after it, or raised IndexError where the layer
      changes the width): a group whose channels reach such a layer is left unpruned
      (``structured_pruning.untraced_groups``, version 4), and ``detect_note`` names the layers
      and counts those groups. Swin (``remove: false``; removal is not applicable): its attention
      runs qkv and proj through ``F.linear``, so its residual stream groups are left unpruned
      (before version 4 they were pruned but for qkv and proj, and a pruned channel still
      received attention's output); on a 32x32 swin_t 3 of 18 groups have an index mapping that
      explodes and 3 (residual streams) reach attention: the 12 MLP hidden groups are pruned.

    Effect: the fraction of Conv/Linear weights that are exactly zero afterwards; with ``remove``,
    the fraction of the original Conv/Linear weights that were removed. On a model with dead weights
    (``wmbench.liveness``; not with ``remove``), ``detect_note`` also gives the fraction of the
    *live* weights that are zero: dead weights only feel weight decay, so they are small and a
    magnitude criterion prunes them first, at no cost to the model."""

    mode: Literal["unstructured", "structured"] = "unstructured"
    scope: Literal["global", "layer"] = "layer"
    remove: bool = False

    @property
    def version(self) -> str:  # type: ignore[override]
        """For ``structured``: 2, torch-pruning's graph is traced with every parameter trainable (a
        frozen front was missing from it, 2026-12-05); 3, a bare parameter's dimension comes from
        its own graph node and its indices in the full group, not from torch-pruning's pruner
        shared by the process (left by whatever model used it last), and Swin's position bias
        tables are never zeroed; 4, a group whose channels reach a layer used outside its forward
        is left unpruned (``untraced_groups``: torch-pruning pruned the wrong channels after it).
        For ``unstructured``: 2, weights of equal magnitude at the cut are zeroed lowest index first
        (``zero_smallest``), where version 1 left the choice to ``torch.topk`` (it may differ
        between the CPU and CUDA, and between torch versions)."""
        return "4" if self.mode == "structured" else "2"

    def check_strength(self, strength: float) -> str | None:
        return None if 0.0 <= strength <= 1.0 else "prune strength is a fraction in [0, 1]"

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"prune strength is a fraction in [0, 1], got {strength}")
        if self.mode == "unstructured":
            if self.remove:
                raise ValueError("prune: remove applies to structured pruning only")
            params = list(weight_params(model).values())
            for chunk in ([params] if self.scope == "global" else [[p] for p in params]):
                zero_smallest(chunk, strength)
            ctx.effect = zero_fraction(model)
            note = live_zero_note(model, ctx)
            if note:
                ctx.notes["detect_note"] = note
            return
        before = sum(p.numel() for p in weight_params(model).values())
        example = ctx.data.train_x[:2].to(next(model.parameters()).device)
        untraced = layers_used_outside_forward(model, example)  # before the model changes
        pruned = structured_prune(model, strength, self.scope, self.remove, example, untraced)
        unseen = untraced_layers_note(model, untraced, pruned, "removed" if self.remove else "zeroed")
        notes = []
        if self.remove:
            after = sum(p.numel() for p in weight_params(model).values())
            ctx.effect = 1.0 - after / before
            notes.append("channels physically removed")
        else:
            ctx.effect = zero_fraction(model)
            live_note = live_zero_note(model, ctx)
            if live_note:
                notes.append(live_note)
        if pruned.skipped:
            notes.append(f"{pruned.skipped} of {pruned.total} channel groups left unpruned (torch-pruning cannot analyse them)")
        if unseen:
            notes.append(unseen)
        if notes:
            ctx.notes["detect_note"] = "; ".join(notes)


NAMED_LAYERS = 4  # layers a note names; the rest are counted


def untraced_layers_note(model: nn.Module, names: list[str], pruned: Pruned, done: str = "zeroed") -> str | None:
    """What ``detect_note`` says of the Conv/Linear layers used outside their forward, ``names``
    (``untraced_layers.layers_used_outside_forward``: torch-pruning does not see them, so their channels
    are not ``done``), or None where there are none: how many of each kind, the first NAMED_LAYERS
    names, and how many channel groups reach them and were left unpruned (``pruned.untraced``)."""
    if not names:
        return None
    kinds: dict[str, int] = {}
    for name in names:
        kind = type(model.get_submodule(name)).__name__
        kinds[kind] = kinds.get(kind, 0) + 1
    them = "them" if len(names) > 1 else "it"
    counted = " and ".join(f"{n} {kind}" for kind, n in kinds.items())
    listed = ", ".join(names[:NAMED_LAYERS]) + (f" and {len(names) - NAMED_LAYERS} more" if len(names) > NAMED_LAYERS else "")
    return (f"structured prune: {counted} layer{'s are' if len(names) > 1 else ' is'} used outside {'their' if len(names) > 1 else 'its'} "
            f"forward (torch-pruning does not see {'them' if len(names) > 1 else 'it'}: {'their' if len(names) > 1 else 'its'} "
            f"channels are not {done}): {listed}"
            + (f"; {pruned.untraced} of {pruned.total} channel groups reach {them} and are left unpruned "
               f"(torch-pruning cannot map channels through {them})" if pruned.untraced else ""))


def live_zero_note(model: nn.Module, ctx: AttackContext) -> str | None:
    """The share of live Conv/Linear weights that are exactly zero, as a note (None: all live)."""
    shape = ctx.data.train_x.shape[1:]
    live = live_map(model, shape)
    zeros, count = 0, 0
    for name, p in weight_params(model).items():
        mask = live.mask(name).to(p.device)
        zeros += int(((p == 0) & mask).sum())
        count += int(mask.sum())
    return live_share_note(model, live, f"{100 * zeros / max(1, count):.1f}% zeroed")


def zero_fraction(model: nn.Module) -> float:
    """Fraction of the Conv/Linear weights that are exactly zero."""
    params = list(weight_params(model).values())
    zeros = sum(int((p == 0).sum()) for p in params)
    return zeros / max(1, sum(p.numel() for p in params))


@torch.no_grad()
def zero_smallest(params: list[nn.Parameter], fraction: float) -> None:
    """Zero the ``fraction`` (Python's ``round``: halves to even) of entries of smallest magnitude among ``params``,
    read as one vector: each flattened row-major, in the order given. Ties at the cut go by
    position: of the entries of equal magnitude, the first are zeroed (NaN counts as the largest
    magnitude), the first k of a stable ascending sort (numpy's ``argsort(kind="stable")``), so
    the zeros depend on the values and their order alone, not on the device, the torch version or
    how the vector is split into params (version 2; version 1 left ties to ``torch.topk``, whose
    choice may differ between the CPU and CUDA). Ties are common where carriers are written with
    equal magnitudes (WaterMAS, Tartaglione) and among weights already zero. No ``params``: nothing
    to zero (``global`` scope on a model without Conv/Linear weights, as ``layer`` scope)."""
    if not params:
        return
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    scores = torch.cat([p.detach().abs().flatten().to(dtype) for p in params])
    k = round(fraction * scores.numel())
    if k == 0:
        return
    drop = first_smallest(scores, k)
    offset = 0
    for p in params:
        p.masked_fill_(drop[offset : offset + p.numel()].view_as(p), 0.0)
        offset += p.numel()


def first_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the first ``k`` entries of a stable ascending sort of the 1-d ``scores`` (NaN
    last), in linear time: the k-th smallest value is the cut, every entry below it is in, and of
    the entries equal to it the lowest indices (``nonzero`` lists them in order) fill the rest."""
    cut = torch.kthvalue(scores, k).values
    if cut.isnan():
        below, tied = ~scores.isnan(), scores.isnan()
    else:
        below, tied = scores < cut, scores == cut
    short = k - int(below.sum())
    below[tied.nonzero().flatten()[:short]] = True
    return below
