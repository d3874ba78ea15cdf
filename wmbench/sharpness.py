"""Sharpness of the loss at a key's carriers: what WaterMAS's MAS step promises to raise."""

from __future__ import annotations

import copy

import torch
from torch import nn

from wmbench.api import Key
from wmbench.data import DataBundle
from wmbench.image_mark import CarrierSet
from wmbench.train import batches


@torch.no_grad()
def test_loss(model: nn.Module, data: DataBundle, batch_size: int = 512) -> float:
    """Mean cross-entropy of ``model`` on the test split (on the CPU)."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total = sum(float(loss_fn(model(x), y)) for x, y in batches(data.test_x, data.test_y, batch_size, torch.device("cpu")))
    return total / len(data.test_y)


test_loss.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into one


@torch.no_grad()
def loss_rise(model: nn.Module, key: Key, data: DataBundle, amount: float, draws: int = 8) -> float:
    """Mean rise of the test loss over ``draws`` moves of every carrier of ``key`` by ``amount`` x
    its tensor's std (Gaussian, from a generator seeded 0: the same moves for every model)."""
    sigma = key.tensors["sigma"].float()
    base = test_loss(model, data)
    g = torch.Generator().manual_seed(0)
    rises = []
    for _ in range(draws):
        moved = copy.deepcopy(model)
        carriers = CarrierSet.bind(moved, key)
        carriers.write(carriers.per_param(carriers.read(len(sigma)) + amount * sigma * torch.randn(len(sigma), generator=g)))
        rises.append(test_loss(moved, data) - base)
    return sum(rises) / draws
