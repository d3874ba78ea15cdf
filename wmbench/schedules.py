"""Learning-rate schedules: the paper's step schedule (per epoch), and per-batch warm-up plus linear
decay or one-cycle (cosine) decay."""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["step", "warmup_linear", "onecycle"]


def lr_factor(schedule: Schedule, step: int, total: int, warmup: int) -> float:
    """The multiplier of the peak lr at batch ``step`` (0-based) of ``total``, ``warmup`` of them
    warming up.

    - ``warmup_linear``: linear from 1/(warmup+1) up to 1 over ``warmup`` batches, then linear down
      to 0 at the end of training;
    - ``onecycle``: linear from 1/25 up to 1 over ``warmup`` batches (a quarter of training when 0),
      then cosine down to 1/25/1e4 (torch's OneCycleLR shape, without momentum cycling)."""
    total = max(total, 1)
    if schedule == "warmup_linear":
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(total - warmup, 1))
    if schedule == "onecycle":
        warmup = warmup if warmup > 0 else max(1, total // 4)
        start, end = 1 / 25, 1 / 25 / 1e4
        if step < warmup:
            return start + (1 - start) * step / warmup
        t = min(1.0, (step - warmup) / max(total - warmup, 1))
        return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2
    raise ValueError(f"unknown per-batch schedule {schedule!r}")


def per_batch_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to step after every batch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(schedule, s, total, warmup))
