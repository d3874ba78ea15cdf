"""Shared set-up of the benchmarks (run with ``pytest tests/perf -m perf``; excluded by default)."""

from __future__ import annotations

import torch

from wmbench.data import DataBundle
from wmbench.registry import MODELS


def cifar_sized_batch(batch_size: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def cifar_like_bundle(batch: tuple[torch.Tensor, torch.Tensor]) -> DataBundle:
    x, y = batch
    return DataBundle("bench", x, y, x[:8], y[:8], 10)


def build_model(name: str, data: DataBundle, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS.build(name).build(data).to(device).train()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def timed_step(step, device: torch.device):
    """``step`` followed by a CUDA synchronisation when on the GPU (so the timing is honest)."""
    def run() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run
