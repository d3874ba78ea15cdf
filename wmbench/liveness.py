"""Structural liveness: which weights can change a model's output at a given input size.

A convolution with zero padding applied to a small feature map has kernel taps that only ever
multiply padding: torchvision's ResNet18 on 32x32 inputs runs its last stage at 1x1, where eight
of the nine taps of every 3x3 kernel see nothing but zeros. Such a weight has an exactly zero
gradient for every input and every value of the other weights: a mark written there is invisible
to the network, and an attack that changes it changes nothing.

The mask is derived from shapes alone, never from values. One forward pass of a zero input
(eval mode, no gradient, nothing in the model changes) records, by forward hooks, the spatial
size of every input each convolution receives. Along each spatial axis, tap j of a kernel with
stride s, padding p and dilation d is live iff some output position o reads a real input
position: 0 <= o*s - p + j*d < n for some o in [0, out). A tap is live iff it is live along every
axis for at least one of the layer's calls. The rule is conservative: everything else (Linear
layers, biases, BatchNorm, transposed or non-zero-padded convolutions, modules that did not run
in eval mode, every weight of a model that cannot run on the shape) counts as live, so a weight marked dead provably has a zero gradient, while a
live one may still be dead for reasons of values (a ReLU that never fires).

Masks are computed for each call, not cached: one forward of a single image (11 ms for ResNet18 at
32x32, 0.4 s for ViT-B/16 at 224x224 on one CPU thread), and the feature-map sizes it records are
what the forward does, which a model's ``repr`` and parameters do not determine (a plug-in's
forward may pool its input under an attribute the ``repr`` does not show: a cache keyed on them
served such a model another's mask until 2026-12-05).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from wmbench.models import weight_params


@dataclass(frozen=True)
class LiveMap:
    """Per parameter, a boolean tensor broadcastable to its shape: True where a weight is live.

    Convolution weights get a (1, 1, *kernel) tap mask; every other parameter a 0-d True."""

    shapes: dict[str, tuple[int, ...]]
    taps: dict[str, Tensor]
    failure: str | None = None  # why the model did not run on the input shape (then every weight counts live)

    def mask(self, name: str) -> Tensor:
        """The full boolean mask of parameter ``name`` (its shape)."""
        return self.taps[name].expand(self.shapes[name])

    def live_count(self, name: str) -> int:
        """How many entries of ``name`` are live."""
        shape = self.shapes[name]
        taps = self.taps[name]
        per_tap = int(torch.Size(shape).numel()) // max(1, taps.numel())
        return int(taps.sum()) * per_tap

    def numel(self, name: str) -> int:
        return int(torch.Size(self.shapes[name]).numel())

    def dead_fraction(self, names: Iterable[str] | None = None) -> float:
        """Share of dead entries among ``names`` (default: every parameter)."""
        names = list(self.shapes if names is None else names)
        total = sum(self.numel(n) for n in names)
        live = sum(self.live_count(n) for n in names)
        return (total - live) / total if total else 0.0

    def live_indices(self, name: str) -> Tensor:
        """Flat indices (into ``param.view(-1)``) of the live entries of ``name``, ascending."""
        return self.mask(name).reshape(-1).nonzero().flatten()


def live_map(model: nn.Module, input_shape: Sequence[int]) -> LiveMap:
    """The structural liveness of every parameter of ``model`` for inputs of ``input_shape``
    (C, H, W), without the batch dimension, from one forward of a zero image."""
    return _compute(model, tuple(int(v) for v in input_shape))


def weight_dead_fraction(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Share of dead entries among the Conv/Linear weights (the tensors marks and attacks act on)."""
    return live_map(model, input_shape).dead_fraction(weight_params(model))


def axis_taps(n: int, kernel: int, stride: int, padding: int, dilation: int) -> Tensor:
    """Along one axis of length ``n``: which of the ``kernel`` taps ever read a real input position."""
    out = (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    o = torch.arange(max(out, 0)).unsqueeze(1)
    pos = o * stride - padding + torch.arange(kernel).unsqueeze(0) * dilation
    return ((pos >= 0) & (pos < n)).any(dim=0)


def conv_taps(conv: nn.modules.conv._ConvNd, spatial: Sequence[int]) -> Tensor:
    """The (1, 1, *kernel) tap mask of ``conv`` applied to inputs of spatial size ``spatial``."""
    k = conv.kernel_size
    if conv.padding == "same":
        pads = [conv.dilation[i] * (k[i] - 1) // 2 for i in range(len(k))]
    elif conv.padding == "valid":
        pads = [0] * len(k)
    else:
        pads = list(conv.padding)  # type: ignore[arg-type]
    mask = torch.ones((), dtype=torch.bool)
    for i in range(len(k)):
        axis = axis_taps(int(spatial[i]), k[i], conv.stride[i], pads[i], conv.dilation[i])
        mask = mask.unsqueeze(-1) & axis  # outer product, axis by axis
    return mask.reshape(1, 1, *k)


def _compute(model: nn.Module, shape: tuple[int, ...]) -> LiveMap:
    seen: dict[str, list[tuple[int, ...]]] = {}
    convs = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.padding_mode == "zeros"
    }

    def recorder(name: str, n_spatial: int):
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            seen.setdefault(name, []).append(tuple(inputs[0].shape[-n_spatial:]))

        return hook

    hooks = [m.register_forward_pre_hook(recorder(name, len(m.kernel_size))) for name, m in convs.items()]
    modes = {m: m.training for m in model.modules()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    failure = None
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    except Exception as exc:  # noqa: BLE001 - a model that cannot run on this shape: nothing is known dead
        failure = " ".join(f"{type(exc).__name__}: {exc}".split())
        seen.clear()
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    shapes, taps = {}, {}
    for name, p in model.named_parameters():
        shapes[name] = tuple(p.shape)
        taps[name] = torch.ones((), dtype=torch.bool)
    for name, conv in convs.items():
        if name not in seen:
            continue  # did not run in eval mode: counted live (conservative)
        union = torch.zeros((1, 1, *conv.kernel_size), dtype=torch.bool)
        for spatial in seen[name]:
            union |= conv_taps(conv, spatial)
        taps[f"{name}.weight" if name else "weight"] = union
    return LiveMap(shapes, taps, failure)


def live_share_note(model: nn.Module, live: LiveMap, what: str) -> str | None:
    """A note for attacks that act on a share of the weights: ``what`` (e.g. "12.5% zeroed"), said
    of the live Conv/Linear weights of ``model`` (``live``: its map), with the dead share; None
    when every weight is live."""
    dead = live.dead_fraction(weight_params(model))
    if dead == 0.0:
        return None
    return f"live weights: {what} ({100 * dead:.1f}% of Conv/Linear weights are dead at this input size)"
