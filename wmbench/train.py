"""Training: SGD with momentum, weight decay and step LR milestones, over tensors held in memory."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wmbench.api import LossFn, StepFn, bounded
from wmbench.data import IGNORE_INDEX, DataBundle
from wmbench.errors import TrainingDiverged


@dataclass(frozen=True)
class TrainingConfig:
    """The ``training:`` block of a scenario."""

    epochs: int = bounded(10, ge=0)
    batch_size: int = bounded(64, ge=2)
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(5e-4, ge=0)
    milestones: list[int] = bounded([], ge=0)
    gamma: float = bounded(0.1, gt=0)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches moved to ``device``, shuffled by ``generator`` when given; drops a last batch of 1."""
    n = len(x)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and generator is not None:
            continue
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


def task_loss(task: str) -> LossFn:
    """Cross-entropy; for segmentation, the mean over the pixels not labelled ``IGNORE_INDEX``.

    A segmentation batch with no labelled pixel gives a loss of 0, where torch's mean reduction
    gives NaN (with zero gradients) and turns the epoch's reported loss into NaN."""
    if task != "segmentation":
        return nn.CrossEntropyLoss()

    def pixel_loss(logits: Tensor, targets: Tensor) -> Tensor:
        total = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (targets != IGNORE_INDEX).sum().clamp_min(1)

    return pixel_loss


class Trainer:
    """Runs epochs of a step function over a dataset with the scenario's optimiser and schedule."""

    def __init__(self, data: DataBundle, config: TrainingConfig, device: torch.device, generator: torch.Generator, desc: str = "train", progress: bool = True) -> None:
        self.data = data
        self.config = config
        self.device = device
        self.generator = generator
        self.desc = desc
        self.progress = progress
        self.epoch_seconds: list[float] = []

    def optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(model.parameters(), lr=lr or c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def fit(self, model: nn.Module, step: StepFn, epochs: int | None = None, data_fraction: float = 1.0, lr: float | None = None) -> None:
        """Train ``model`` for ``epochs`` (default: the config's) calling ``step`` on each batch."""
        c = self.config
        epochs = c.epochs if epochs is None else epochs
        optimizer = self.optimizer(model, lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma)
        loss_fn = task_loss(self.data.task)
        x, y = self.data.train_x, self.data.train_y
        if data_fraction < 1.0:
            keep = torch.randperm(len(x), generator=self.generator)[: max(2, int(len(x) * data_fraction))]
            x, y = x[keep], y[keep]
        model.to(self.device).train()
        bar = tqdm(range(epochs), desc=self.desc, unit="epoch", leave=False, disable=not self.progress)
        for epoch in bar:
            start = time.perf_counter()
            total, count = 0.0, 0
            for batch in batches(x, y, c.batch_size, self.device, self.generator):
                total += float(step(model, batch, loss_fn, optimizer)) * len(batch[1])
                count += len(batch[1])
            if not math.isfinite(total):
                raise TrainingDiverged(f"{self.desc}: the training loss became {total} at epoch {epoch + 1} (learning rate or method strength too large?)")
            scheduler.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.epoch_seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
        model.eval()

    @property
    def seconds_per_epoch(self) -> float | None:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else None


@contextlib.contextmanager
def untouched_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics and leave their buffers (running mean,
    variance and batch count) untouched during the block: for the extra passes of a training step
    (MAS's perturbed pass, Tartaglione's replicas)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
