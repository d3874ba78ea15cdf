"""``cifar_speednet``: the compact CIFAR network shaped after airbench (Jordan 2024, arXiv
2404.00498), the CPU-feasible model at a real operating point (README, "Training recipe and fast path")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wmbench.api import bounded
from wmbench.data import DataBundle
from wmbench.errors import ConfigError
from wmbench.models import Model
from wmbench.registry import MODELS


class SpeedNet(nn.Module):
    """The network of ``cifar_speednet``: a 2x2 patch stem, three conv blocks, a scaled linear head."""

    # The Trainer's default memory format: channels-last on the CPU only (README, Performance:
    # 1.1-1.3x faster on the CPU, 5-6% slower on an H200, where this net is launch-bound).
    prefers_channels_last = frozenset({"cpu"})

    def __init__(self, in_channels: int, num_classes: int, stem: int, widths: tuple[int, ...], head_scale: float) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 2, bias=False), nn.BatchNorm2d(stem), nn.GELU())
        blocks, width = [], stem
        for out in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(width, out, 3, padding=1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(out),
                nn.GELU(),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.GELU(),
            ))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(width, num_classes, bias=False)
        self.head_scale = head_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1)) * self.head_scale


@MODELS.register("cifar_speednet")
@dataclass(frozen=True)
class CifarSpeedNet(Model):
    """A compact CIFAR network shaped after airbench (Jordan 2024, arXiv 2404.00498), re-implemented
    from the paper's description: a 2x2 patch convolution stem (no padding: 32 -> 31 pixels), then
    per width a block conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU
    (31 -> 15 -> 7 -> 3 pixels), a global max-pool and a bias-free linear head whose logits are
    multiplied by ``head_scale``. ``whiten``: the stem starts as airbench's whitening layer (the
    eigenvectors of the training images' 2x2-patch covariance, scaled by 1/sqrt(eigenvalue), each
    with its negative; ``stem_whitening``) instead of a random init. [wmbench choice] unlike
    airbench: the stem stays trainable and is followed by BatchNorm (a frozen layer would be one
    no carrier may use), ordinary affine BatchNorm; lookahead, the alternating flip and test-time
    augmentation are training and measurement options, not part of the model; whiten is off by
    default. ``dirac``: every block's 3x3 convolutions start as a partial identity (their first
    in-channels filters pass their input through, ``torch.nn.init.dirac_``; airbench's init).
    ``bn_weight: false``: the BatchNorm scales stay 1 and do not train (airbench's BatchNorm; pair it
    with ``training.bias_lr_scale``). Both off by default.
    Needs inputs of at least 16x16 pixels (three 2x poolings after the stem).
    On the CPU the Trainer feeds it channels-last inputs unless ``training.channels_last`` says otherwise."""

    stem: int = bounded(24, ge=1)
    widths: list[int] = bounded([64, 256, 256], ge=1)
    head_scale: float = bounded(1 / 9, gt=0)
    whiten: bool = False
    dirac: bool = bounded(False, added=True)
    bn_weight: bool = bounded(True, added=True)

    def build(self, data: DataBundle) -> nn.Module:
        self.check_task(data)
        if len(self.widths) == 0:
            raise ConfigError("models", "cifar_speednet needs at least one width")
        smallest = 2 ** len(self.widths) * 2
        if min(data.image_size) < smallest:
            raise ConfigError("models", f"cifar_speednet with {len(self.widths)} blocks needs images of at least {smallest}x{smallest} pixels, got {data.image_size}")
        net = SpeedNet(data.in_channels, data.num_classes, self.stem, tuple(self.widths), self.head_scale)
        if self.whiten:
            filters = stem_whitening(data.train_x)[: self.stem]
            with torch.no_grad():
                net.stem[0].weight[: len(filters)] = filters.to(net.stem[0].weight.dtype)
        if self.dirac:
            with torch.no_grad():
                for conv in (m for m in net.blocks.modules() if isinstance(m, nn.Conv2d)):
                    nn.init.dirac_(conv.weight[: conv.in_channels])
        if not self.bn_weight:
            for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.weight.requires_grad_(False)
        return net


WHITENING_IMAGES = 2000  # images whose 2x2 patches estimate the covariance (evenly spaced: class-sorted data)


def stem_whitening(images: Tensor, size: int = 2, eps: float = 5e-4) -> Tensor:
    """airbench's whitening filters for a ``size`` x ``size`` patch stem: the eigenvectors of the
    patch covariance of (an evenly spaced subset of) ``images``, each scaled by 1/sqrt(eigenvalue +
    eps), largest eigenvalue first, followed by their negatives: 2 x C x size x size filters."""
    step = max(1, len(images) // WHITENING_IMAGES)
    x = images[::step][:WHITENING_IMAGES].double()
    c = x.shape[1]
    patches = x.unfold(2, size, 1).unfold(3, size, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
    filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).flip(0).reshape(-1, c, size, size)
    return torch.cat([filters, -filters]).float()
