"""Batch augmentation on the training device: random translation (crop with padding), horizontal
flip and cutout, each drawn for the whole batch at once (no per-image Python loop).

Random numbers come from the run's CPU generator (a few integers per image), so a run is the same
on any device; the pixels never leave the device they are on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wmbench.data import IGNORE_INDEX


@dataclass(frozen=True)
class Augment:
    """What to apply: ``translate`` pixels of reflect padding then a random crop back to size
    (0: none), a horizontal flip with probability 1/2, a ``cutout`` x ``cutout`` square set to 0
    (the mean colour, after normalisation) at a random centre (0: none)."""

    translate: int = 0
    flip: bool = False
    cutout: int = 0

    @property
    def active(self) -> bool:
        return self.translate > 0 or self.flip or self.cutout > 0

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The augmented batch; ``y`` (N, H, W) label maps move with their images (padding labelled
        ``IGNORE_INDEX``, cutout leaves labels alone); class labels (N,) are returned unchanged."""
        if self.flip:
            x, y = flip(x, y, generator)
        if self.translate > 0:
            x, y = translate(x, y, self.translate, generator)
        if self.cutout > 0:
            x = cutout(x, self.cutout, generator)
        return x, y


def _draw(n: int, high: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, high, (n,), generator=generator).to(device)


def flip(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each image (and its label map) mirrored left-right with probability 1/2."""
    return mirror(x, y, _draw(len(x), 2, generator, x.device).bool())


def mirror(x: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The images where ``mask`` (N,) is set mirrored left-right, with their label maps when ``y``
    is one (N, H, W); class labels (N,) are returned unchanged."""
    x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    if y.dim() == 3:
        y = torch.where(mask.view(-1, 1, 1), y.flip(-1), y)
    return x, y


class AlternatingFlip:
    """airbench's derandomised flip (Jordan 2024, arXiv 2404.00498), re-implemented from its
    description: a random half of the training images is mirrored in the first epoch, and in every
    later epoch each image is mirrored exactly when it was not in the epoch before, so every image
    is seen both ways in any two consecutive epochs. The draw comes from the run's generator at the
    start of a fit, so a fit resumed from a checkpoint draws the same one."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.first = _draw(n, 2, generator, torch.device("cpu")).bool()

    def mask(self, epoch: int) -> Tensor:
        """Which images are mirrored in ``epoch`` (0-based)."""
        return self.first ^ bool(epoch % 2)


def _crop_index(n: int, h: int, w: int, pad: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image row and column indices (N, H, 1), (N, 1, W) into the padded image."""
    dy, dx = _draw(n, 2 * pad + 1, generator, device), _draw(n, 2 * pad + 1, generator, device)
    rows = dy.view(-1, 1, 1) + torch.arange(h, device=device).view(1, -1, 1)
    cols = dx.view(-1, 1, 1) + torch.arange(w, device=device).view(1, 1, -1)
    return rows, cols


def translate(x: Tensor, y: Tensor, pad: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random crop of the ``pad``-pixel reflect-padded image back to its size: a shift of up to
    ``pad`` pixels each way, one gather for the batch; label maps (N, H, W) move along."""
    n, c, h, w = x.shape
    pad = min(pad, h - 1, w - 1)  # reflect padding needs pad < size
    rows, cols = _crop_index(n, h, w, pad, generator, x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if y.dim() == 3:
        padded_y = F.pad(y, (pad, pad, pad, pad), value=IGNORE_INDEX)
        y = padded_y[batch, rows, cols]
    return x, y  # strided as channels_last (the gather runs over N, H, W); the trainer sets the format


def cutout(x: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """A ``size`` x ``size`` square (clipped at the border) set to 0 at a random centre per image."""
    n, _, h, w = x.shape
    cy, cx = _draw(n, h, generator, x.device), _draw(n, w, generator, x.device)
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device).view(1, -1, 1)
    c = torch.arange(w, device=x.device).view(1, 1, -1)
    inside = (r >= top.view(-1, 1, 1)) & (r < (top + size).view(-1, 1, 1)) & (c >= left.view(-1, 1, 1)) & (c < (left + size).view(-1, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), 0.0)
