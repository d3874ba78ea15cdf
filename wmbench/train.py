"""Training: SGD with momentum, weight decay and a schedule, over tensors held in memory.

The recipe fields (augmentation, label smoothing, Nesterov, warm-up schedules) and the fast path
(data held on the training device, channels-last inputs, bf16 autocast, torch.compile) all default
to the plain loop the paper describes: a scenario that does not name them trains as before, bit
for bit."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wmbench.api import LossFn, Progress, StatefulStep, StepFn, bounded
from wmbench.augment import AlternatingFlip, Augment, mirror
from wmbench.checkpoint import EpochCheckpoints
from wmbench.data import IGNORE_INDEX, DataBundle, normalize, share_indices
from wmbench.errors import TrainingDiverged
from wmbench.lookahead import Lookahead
from wmbench.schedules import Schedule, per_batch_scheduler


@dataclass(frozen=True)
class TrainingConfig:
    """The ``training:`` block of a scenario."""

    epochs: int = bounded(10, ge=1, le=100_000)  # 0 would judge untrained models (an attack's own retraining is built directly)
    batch_size: int = bounded(64, ge=2)
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(5e-4, ge=0)
    milestones: list[int] = bounded([], ge=0)
    gamma: float = bounded(0.1, gt=0)
    # The recipe (README, "Training recipe and fast path"); the defaults are the plain paper loop.
    schedule: Schedule = "step"  # step: milestones and gamma, per epoch; the others per batch
    warmup_epochs: float = bounded(0.0, ge=0)
    nesterov: bool = False
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    translate: int = bounded(0, ge=0)  # pixels of reflect padding, then a random crop
    flip: bool = False
    alternate_flip: bool = False  # with flip: airbench's derandomised flip (wmbench.augment.AlternatingFlip)
    cutout: int = bounded(0, ge=0)  # side of the zeroed square, pixels
    lookahead: bool = False  # airbench's lookahead weight averaging (wmbench.lookahead)
    bias_lr_scale: float = bounded(1.0, gt=0)  # 1-D parameters: lr x scale, weight decay / scale (airbench: 64)
    # The fast path (same section). channels_last None: the model's own preference.
    channels_last: bool | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:  # single-field ranges are declared with bounded() above
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        if self.alternate_flip and not self.flip:
            raise ValueError("alternate_flip needs flip: true")

    @property
    def augment(self) -> Augment:
        """The per-batch augmentation (the flip is drawn per epoch instead under ``alternate_flip``)."""
        return Augment(self.translate, self.flip and not self.alternate_flip, self.cutout)


FAST_PATH_FIELDS = ("channels_last", "precision", "compile")


def on_fast_path_of(config: TrainingConfig, source: TrainingConfig | None) -> TrainingConfig:
    """``config`` with ``source``'s fast path (its ``FAST_PATH_FIELDS``), or unchanged without one."""
    if source is None:
        return config
    return replace(config, **{name: getattr(source, name) for name in FAST_PATH_FIELDS})


def batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches moved to ``device``, shuffled by ``generator`` when given; drops a last batch of 1."""
    n = len(x)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and generator is not None:
            continue
        yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)


def task_loss(task: str, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy; for segmentation, the mean over the pixels not labelled ``IGNORE_INDEX``.

    A segmentation batch with no labelled pixel gives a loss of 0, where torch's mean reduction
    gives NaN (with zero gradients) and turns the epoch's reported loss into NaN."""
    if task != "segmentation":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def pixel_loss(logits: Tensor, targets: Tensor) -> Tensor:
        total = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)
        return total / (targets != IGNORE_INDEX).sum().clamp_min(1)

    return pixel_loss


class Trainer:
    """Runs epochs of a step function over a dataset with the scenario's optimiser and schedule."""

    def __init__(self, data: DataBundle, config: TrainingConfig, device: torch.device, generator: torch.Generator, desc: str = "train", progress: Progress = True) -> None:
        self.data = data
        self.config = config
        self.device = device
        self.generator = generator
        self.desc = desc
        self.progress = progress
        self.epoch_seconds: list[float] = []
        self.on_epoch: Callable[[nn.Module, int], None] | None = None  # called after each epoch (eval mode), e.g. to measure a curve
        self.checkpoints: EpochCheckpoints | None = None  # set: each fit saves its epochs and continues from them
        self._fits = 0  # fit calls so far: a training's checkpoints are numbered by them

    def optimizer(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        """SGD over the model's parameters; under ``bias_lr_scale`` the 1-D ones (biases,
        normalisation weights) form a second group at lr x scale and weight decay / scale, so their
        decay per step (lr x weight decay) is the others'."""
        c = self.config
        lr, params = lr or c.lr, list(model.parameters())
        groups: list[dict] = [{"params": params}] if c.bias_lr_scale == 1.0 else [
            {"params": [p for p in params if p.dim() != 1]},
            {"params": [p for p in params if p.dim() == 1], "lr": lr * c.bias_lr_scale, "weight_decay": c.weight_decay / c.bias_lr_scale},
        ]
        return torch.optim.SGD(groups, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)

    def fit(self, model: nn.Module, step: StepFn, epochs: int | None = None, data_fraction: float = 1.0, lr: float | None = None) -> None:
        """Train ``model`` for ``epochs`` (default: the config's) calling ``step`` on each batch.

        ``lr`` replaces the config's peak lr; the schedule runs again over these epochs."""
        c = self.config
        epochs = c.epochs if epochs is None else epochs
        optimizer = self.optimizer(model, lr)
        loss_fn = task_loss(self.data.task, c.label_smoothing)
        data = DeviceData.hold(self.data, self.device, self.generator, data_fraction)
        per_epoch = len(data) // c.batch_size + (len(data) % c.batch_size >= 2)  # a last batch of 1 is dropped
        if per_epoch == 0 and epochs > 0:  # else it would "train" without a single step
            raise ValueError(f"{self.desc}: {len(data)} training image(s): a training step needs at least 2")
        if c.schedule == "step":
            scheduler, per_batch = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma), False
        else:
            warmup = round(c.warmup_epochs * per_epoch)
            scheduler, per_batch = per_batch_scheduler(optimizer, c.schedule, epochs * per_epoch, warmup), True
        model.to(self.device).train()
        fit_index, self._fits = self._fits, self._fits + 1
        lookahead = Lookahead(model, epochs * per_epoch) if c.lookahead else None
        alternating = AlternatingFlip(len(data), self.generator) if c.alternate_flip else None
        step_state = step.state if isinstance(step, StatefulStep) else {}
        saved_state = {**step_state, **(lookahead.state if lookahead else {})}
        first = self._resume(fit_index, epochs, model, optimizer, saved_state, scheduler, per_epoch if per_batch else 1)
        fast = FastPath.for_model(model, c, self.device)
        net, step = fast.prepare(model, step)
        augment = c.augment
        bar = tqdm(range(first, epochs), desc=self.desc, unit="epoch", leave=False, disable=self.progress is not True, initial=first, total=epochs)
        for epoch in bar:
            start = time.perf_counter()
            total, count = 0.0, 0
            mirrored = alternating.mask(epoch) if alternating is not None else None
            for i, (x, y) in enumerate(data.batches(c.batch_size, self.generator, mirrored)):
                if augment.active:
                    x, y = augment(x, y, self.generator)
                batch = (fast.inputs(x), y)
                total += float(step(net, batch, loss_fn, optimizer)) * len(y)
                count += len(y)
                if per_batch:
                    scheduler.step()
                if lookahead is not None:
                    lookahead.after_step(model, epoch * per_epoch + i + 1)
            if lookahead is not None and epoch == epochs - 1:
                lookahead.finish(model)
            if not math.isfinite(total):
                raise TrainingDiverged(f"{self.desc}: the training loss became {total} at epoch {epoch + 1} (learning rate or method strength too large?)")
            if not per_batch:
                scheduler.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.epoch_seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
            if self.progress == "lines":
                print(f"{self.desc}: epoch {epoch + 1}/{epochs}, loss {total / max(count, 1):.3f}, {self.epoch_seconds[-1]:.0f} s", file=sys.stderr, flush=True)
            if self.on_epoch is not None:
                model.eval()
                self.on_epoch(model, epoch + 1)
                model.train()
            if self.checkpoints is not None:
                self.checkpoints.save(fit_index, epoch + 1, epochs, self.epoch_seconds, model, optimizer, self.generator, saved_state)
        model.eval()

    def _resume(
        self, fit_index: int, epochs: int, model: nn.Module, optimizer: torch.optim.Optimizer,
        step_state: dict[str, Tensor | torch.Generator], scheduler: torch.optim.lr_scheduler.LRScheduler, steps_per_epoch: int,
    ) -> int:
        """The first epoch to run: after the fit's checkpoint when there is one (its state loaded
        and the schedule replayed to it), else 0."""
        resumed = self.checkpoints.restore(fit_index, epochs, model, optimizer, self.generator, step_state) if self.checkpoints else None
        if resumed is None:
            return 0
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": a replay
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(resumed.epoch * steps_per_epoch):
                scheduler.step()
        self.epoch_seconds = resumed.epoch_seconds
        if self.progress == "lines" and resumed.epoch < epochs:
            print(f"{self.desc}: continuing after epoch {resumed.epoch}/{epochs} from its checkpoint", file=sys.stderr, flush=True)
        return resumed.epoch

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


@dataclass
class DeviceData:
    """The training split held on the training device once: uint8 when the bundle has it (then
    normalised per batch, to the same values as the bundle's float images), else float."""

    x: Tensor
    y: Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def hold(cls, data: DataBundle, device: torch.device, generator: torch.Generator, fraction: float = 1.0) -> "DeviceData":
        """The training split (a random ``fraction`` of it, drawn from ``generator``) on ``device``."""
        raw = data.train_u8 is not None and data.mean is not None and data.std is not None
        x = data.train_u8 if raw else data.train_x
        y = data.train_y
        assert x is not None
        if fraction < 1.0:
            keep = share_indices(len(x), fraction, generator)
            x, y = x[keep], y[keep]
        return cls(x.to(device), y.to(device), data.mean if raw else None, data.std if raw else None)

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int, generator: torch.Generator, mirrored: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled float mini-batches (the order drawn from ``generator``); drops a last batch of 1.
        ``mirrored``: one flag per held image, those to mirror left-right (with their label maps)."""
        order = torch.randperm(len(self.x), generator=generator).to(self.x.device)
        if mirrored is not None:
            mirrored = mirrored.to(self.x.device)
        for start in range(0, len(self.x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            x, y = self.x[idx], self.y[idx]
            if mirrored is not None:
                x, y = mirror(x, y, mirrored[idx])
            if self.mean is not None and self.std is not None:
                x = normalize(x, self.mean, self.std)
            yield x, y


def model_prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """The model's ``prefers_channels_last``: a bool, or the device types ("cpu", "cuda") where it does."""
    preference = getattr(model, "prefers_channels_last", False)
    return device.type in preference if isinstance(preference, (set, frozenset)) else bool(preference)


@dataclass
class FastPath:
    """How a training runs its steps: inputs in channels-last memory format (the weights stay in
    the default format, so every method's flat carrier indices keep their meaning), bf16 autocast
    (weights, gradients and optimiser state stay fp32), torch.compile of the forward pass."""

    channels_last: bool
    precision: str
    compile: bool
    device: torch.device

    @classmethod
    def for_model(cls, model: nn.Module, config: TrainingConfig, device: torch.device) -> "FastPath":
        channels_last = config.channels_last if config.channels_last is not None else model_prefers_channels_last(model, device)
        return cls(channels_last, config.precision, config.compile, device)

    def inputs(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x.contiguous()

    def prepare(self, model: nn.Module, step: StepFn) -> tuple[nn.Module, StepFn]:
        """The module to call (compiled or not) and the step (under autocast or not)."""
        if self.compile and self.device.type == "cpu":  # a CPU build says "No CUDA runtime is found": noise here
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        net: nn.Module = torch.compile(model) if self.compile else model  # type: ignore[assignment]
        if self.precision != "bf16":
            return net, step
        device_type = self.device.type

        def autocast_step(m: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> Tensor:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                return step(m, batch, loss_fn, optimizer)

        return net, autocast_step
