"""A reference training throughput, so that training minutes from different machines compare.

Machines that report the same processor name differ up to 3x in speed (README, "Training recipe
and fast path"), so a minute of training says little without the machine's speed beside it. The
probe runs plain SGD steps of one fixed network (cifar_speednet 32/128/128, batch 256 of random
3x32x32 images, channels-last inputs, the run's thread count) for a few seconds and reports images
per second. Training minutes scale roughly with its inverse: 10 minutes on a machine that probes
at 900 are about 30 on one that probes at 300. Curve points and grid rows record it
(``reference_images_per_s``), measured once per process before its first training."""

from __future__ import annotations

import functools
import math
import os
import time

import torch
from torch import nn

from wmbench.api import plain_step
from wmbench.errors import WmbenchError
from wmbench.speednet import SpeedNet

PROBE_SECONDS = 5.0  # timed steps run until this much time has passed (after one warm-up step)
PROBE_SECONDS_ENV = "WMBENCH_PROBE_SECONDS"  # overrides it for runs and curves; 0 turns the probe off
PROBE_BATCH = 256


def reference_images_per_s(device: torch.device, seconds: float = PROBE_SECONDS) -> float:
    """Training images per second of the reference step on ``device`` with the current torch
    thread count. Leaves the global random state as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        net = SpeedNet(3, 10, 24, (32, 128, 128), 1 / 9).to(device).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        x = torch.randn(PROBE_BATCH, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (PROBE_BATCH,), device=device)

        plain_step(net, (x, y), nn.functional.cross_entropy, optimizer)  # warm-up: allocations, kernel selection
        steps, start = 0, time.perf_counter()
        while True:
            plain_step(net, (x, y), nn.functional.cross_entropy, optimizer)
            steps += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return steps * PROBE_BATCH / elapsed


def process_machine_speed(device: torch.device) -> float | None:
    """``reference_images_per_s`` for ``device`` at the current thread count, measured once per
    process (the first training of a grid worker pays its seconds; the rest reuse it); None when
    ``$WMBENCH_PROBE_SECONDS`` is 0."""
    return _measured_once(str(device), torch.get_num_threads(), probe_seconds())


def probe_seconds() -> float:
    """How long the probe runs: ``$WMBENCH_PROBE_SECONDS``, else PROBE_SECONDS."""
    raw = os.environ.get(PROBE_SECONDS_ENV, "")
    if not raw:
        return PROBE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise WmbenchError(f"${PROBE_SECONDS_ENV} is {raw!r}: give a number of seconds >= 0 (0 turns the speed probe off)")
    return seconds


@functools.cache
def _measured_once(device: str, threads: int, seconds: float) -> float | None:
    return reference_images_per_s(torch.device(device), seconds) if seconds > 0 else None
