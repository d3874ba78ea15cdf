"""Shared set-up of the benchmarks (run with ``pytest tests/perf -m perf``; excluded by default)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wmbench.api import plain_step
from wmbench.data import DataBundle
from wmbench.registry import METHODS, MODELS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cifar_sized_batch(batch_size: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def bench_training_step(benchmark: Any, method: str, model_name: str, device_name: str, rounds: int, args: dict[str, Any] | None = None) -> None:
    """Time one training step of ``method`` ("plain" for a plain step; ``args`` its YAML args) on
    ``model_name`` with a CIFAR-sized batch of 128. The step is the closure the method's ``embed`` binds (``step_fn``);
    each model and device is one benchmark group, so the relative column reads as the ratio."""
    device = torch.device(device_name)
    x, y = cifar_sized_batch()
    data = DataBundle("bench", x, y, x[:8], y[:8], 10)
    torch.manual_seed(0)
    model = MODELS.build(model_name).build(data).to(device).train()
    batch = (x.to(device), y.to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    if method == "plain":
        step_fn = plain_step
    else:
        built = METHODS.build(method, args or {})
        step_fn = built.step_fn(model, built.keygen(model, data, torch.Generator().manual_seed(0)))
        model.train()

    def step() -> None:
        step_fn(model, batch, loss_fn, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the timing is honest

    benchmark.group = f"{model_name} {device_name} batch 128"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=2)
