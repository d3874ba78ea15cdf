"""A reference training throughput, so that training minutes from different machines compare.

Machines that report the same processor name differ up to 3x in speed (README, "Training recipe
and fast path"), so a minute of training says little without the machine's speed beside it. The
probe runs plain SGD steps of one fixed network (cifar_speednet 32/128/128, batch 256 of random
3x32x32 images, channels-last inputs, the run's thread count) for a few seconds and reports images
per second. Training minutes scale roughly with its inverse: 10 minutes on a machine that probes
at 900 are about 30 on one that probes at 300."""

from __future__ import annotations

import time

import torch
from torch import nn

from wmbench.api import plain_step
from wmbench.models import SpeedNet

PROBE_SECONDS = 5.0  # timed steps run until this much time has passed (after one warm-up step)
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
