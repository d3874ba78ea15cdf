"""One WaterMAS training step against one plain step (target: at most 2.0x; two passes is the floor).

Run: ``pytest tests/perf/test_step_cost.py -m perf``; each model is one benchmark group, so the
table's relative column reads as the cost ratio to the plain step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench_setup import DEVICES, build_model, cifar_like_bundle, cifar_sized_batch, timed_step
from wmbench.api import plain_step
from wmbench.image_mark import CarrierSet
from wmbench.methods.watermas import CarrierMasks, mas_step
from wmbench.registry import METHODS

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("step_name", ["plain", "watermas"])
def test_training_step(benchmark, step_name: str, model_name: str, device_name: str) -> None:
    device = torch.device(device_name)
    batch = cifar_sized_batch()
    data = cifar_like_bundle(batch)
    model = build_model(model_name, data, device)
    batch = (batch[0].to(device), batch[1].to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    if step_name == "plain":
        step = lambda: plain_step(model, batch, loss_fn, optimizer)  # noqa: E731
    else:
        method = METHODS.build("watermas")
        key = method.keygen(model, data, torch.Generator().manual_seed(0))
        carriers = CarrierMasks.build(CarrierSet.bind(model, key), key.tensors["values"])
        step = lambda: mas_step(model, batch, loss_fn, optimizer, carriers, method.rho, method.lam)  # noqa: E731
    benchmark.group = f"{model_name} {device_name} batch 128"
    rounds = 20 if model_name == "small_cnn" or device.type == "cuda" else 6
    benchmark.pedantic(timed_step(step, device), rounds=rounds, warmup_rounds=2)
