"""Lookahead weight averaging: the slow copy follows the schedule airbench describes, the model ends
on the slow weights, a weight that never moves stays bit-identical, and a training with it is
seeded like any other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wmbench.api import plain_step
from wmbench.datasets.synthetic import Synthetic
from wmbench.lookahead import BASE_DECAY, PERIOD, Lookahead
from wmbench.registry import MODELS
from wmbench.train import Trainer, TrainingConfig


def test_averages_every_period_with_a_cubic_decay_and_ends_on_the_slow_weights() -> None:
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    la = Lookahead(model, total=10)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.after_step(model, PERIOD - 1)  # not a multiple of the period: nothing happens
    assert torch.equal(model.weight, torch.ones(1, 3)) and torch.equal(la.slow["weight"], torch.zeros(1, 3))
    la.after_step(model, 10)  # the last step: decay BASE_DECAY
    expected = torch.full((1, 3), 1 - BASE_DECAY)
    assert torch.allclose(la.slow["weight"], expected) and torch.equal(model.weight, la.slow["weight"])
    with torch.no_grad():
        model.weight.fill_(5.0)
    la.finish(model)
    assert torch.equal(model.weight, la.slow["weight"]) and torch.allclose(model.weight, expected)


def test_early_steps_are_not_averaged() -> None:
    model = nn.Linear(3, 1, bias=False)
    la = Lookahead(model, total=10_000)
    with torch.no_grad():
        model.weight.add_(1.0)
    moved = model.weight.detach().clone()
    la.after_step(model, PERIOD)  # decay = BASE_DECAY * (5/10000)^3, about 1e-10
    assert torch.allclose(model.weight, moved, rtol=0, atol=1e-6)


def test_unchanged_weights_and_integer_buffers_stay_bit_identical() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    frozen = model[0].weight.detach().clone()
    la = Lookahead(model, total=20)
    assert "1.num_batches_tracked" not in la.slow
    for step in range(1, 21):
        with torch.no_grad():
            model[0].bias.add_(0.1 * step)
            model[1].num_batches_tracked += 1
        la.after_step(model, step)
    la.finish(model)
    assert torch.equal(model[0].weight, frozen)
    assert int(model[1].num_batches_tracked) == 20
    assert not torch.equal(model[0].bias, torch.zeros(4))


@pytest.mark.parametrize("seed", [0, 1])
def test_training_with_lookahead_is_seeded_and_differs_from_without(seed: int) -> None:
    data = Synthetic(n_train=128, size=16).load(None)  # type: ignore[arg-type]
    config = dict(epochs=3, batch_size=16, lr=0.05, schedule="warmup_linear", translate=1, flip=True)
    runs = {}
    for name, lookahead in (("a", True), ("b", True), ("off", False)):
        torch.manual_seed(0)
        model = MODELS.build("cifar_speednet", {"stem": 8, "widths": [8, 16, 16]}).build(data)
        Trainer(data, TrainingConfig(**config, lookahead=lookahead), torch.device("cpu"), torch.Generator().manual_seed(seed), progress=False).fit(model, plain_step)
        runs[name] = model.state_dict()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["off"][k]) for k in runs["a"])
