"""DeepSigns' mark is a function of every parameter upstream of its probe, so its carriers are all
of them: on a model whose last block before the classifier is Conv-BatchNorm-ReLU6 (mobilenet_v2's
end, at test size), a key leak that re-drew only the Conv/Linear weights left the mark in the
BatchNorm's gamma and beta (bit accuracy 0.72-0.81, p < 1e-4, over the seeds below); re-drawing
every carrier takes it to chance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.registry import ATTACKS, METHODS
from wmbench.train import Trainer, TrainingConfig

from conftest import CPU


def bn_head(in_channels: int, num_classes: int, width: int = 256) -> nn.Sequential:
    """Conv-BN-ReLU, then a wide 1x1 Conv-BN-ReLU6, pooling and the classifier (mobilenet_v2's end)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )


@pytest.fixture(scope="module")
def marked(digits):
    torch.manual_seed(0)
    model = bn_head(digits.in_channels, digits.num_classes)
    trainer = Trainer(digits, TrainingConfig(epochs=1, lr=0.05), CPU, torch.Generator().manual_seed(0), progress=False)
    key = METHODS.build("deepsigns").embed(model, trainer, torch.Generator().manual_seed(1))
    return model.eval(), key


def test_carriers_are_every_parameter_upstream_of_the_probe(marked):
    model, key = marked
    assert key.meta["layer"] == "8"
    carriers = METHODS.build("deepsigns").carriers(key)
    assert list(carriers) == ["0.weight", "1.weight", "1.bias", "3.weight", "4.weight", "4.bias"]  # not 8's, not the running statistics
    named = dict(model.named_parameters())
    assert all(torch.equal(idx, torch.arange(named[n].numel())) for n, idx in carriers.items())


def test_key_leak_of_every_carrier_takes_the_mark_to_chance(marked, digits):
    model, key = marked
    method = METHODS.build("deepsigns")
    assert method.detect(model, key).stat == 1.0
    stats = []
    for seed in range(4):
        ctx = AttackContext(digits, torch.Generator().manual_seed(seed), CPU, method, key, progress=False)
        attacked = ATTACKS.build("key_leak").apply(copy.deepcopy(model), 1.0, ctx)
        assert torch.isfinite(attacked(digits.test_x[:16])).all()  # the running variances were left alone
        result = method.detect(attacked, key)
        assert result.pvalue > 1e-3, (seed, result)
        stats.append(result.stat)
    assert abs(sum(stats) / len(stats) - 0.5) < 0.1, stats
