"""One training step of each baseline against one plain step, on resnet18 with CIFAR-sized batches.

Run: ``pytest tests/perf/test_baseline_step_cost.py -m perf``; one benchmark group per device, so
the table's relative column reads as the cost ratio to the plain step. Each method's step is the
closure its ``embed`` binds (``step_fn``), built on a freshly initialised model: Uchida adds a
projection regulariser, Tartaglione 1 + R passes (R = 2), Li a sign projection after a plain step
(the fine-tuning step; its plain training epochs cost exactly a plain step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench_setup import DEVICES, build_model, cifar_like_bundle, cifar_sized_batch, timed_step
from wmbench.api import plain_step
from wmbench.registry import METHODS

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("step_name", ["plain", "uchida", "tartaglione", "li_sign"])
def test_baseline_step(benchmark, step_name: str, device_name: str) -> None:
    device = torch.device(device_name)
    batch = cifar_sized_batch()
    data = cifar_like_bundle(batch)
    model = build_model("resnet18", data, device)
    batch = (batch[0].to(device), batch[1].to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    if step_name == "plain":
        step_fn = plain_step
    else:
        method = METHODS.build(step_name)
        key = method.keygen(model, data, torch.Generator().manual_seed(0))
        step_fn = method.step_fn(model, key)  # type: ignore[attr-defined]
        model.train()
    step = lambda: step_fn(model, batch, loss_fn, optimizer)  # noqa: E731
    benchmark.group = f"resnet18 {device_name} batch 128"
    rounds = 20 if device.type == "cuda" else 6
    benchmark.pedantic(timed_step(step, device), rounds=rounds, warmup_rounds=2)
