"""wmbench.thief_models: a thief's own model stored under everything its training reads, and the
context's strength-free seed it is drawn from."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from wmbench import thief_models
from wmbench.api import AttackContext
from wmbench.attacks.distill import fresh_copy
from wmbench.data import DataBundle, random_share
from wmbench.train import TrainingConfig

CPU = torch.device("cpu")


def bundle(seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    return DataBundle("toy", torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g),
                      torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g), 3)


def net(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def key(model=None, data=None, config=None, device=CPU, *settings):
    model = net() if model is None else model
    data = bundle() if data is None else data
    return thief_models.thief_key(model, data.train_x[:2], data, config or TrainingConfig(epochs=1), device, *(settings or ("merge", 0)))


@pytest.fixture(autouse=True)
def empty_store():
    thief_models.clear()
    yield
    thief_models.clear()


def test_the_key_follows_everything_the_training_reads():
    torch.manual_seed(0)
    model, data = net(), bundle()
    base = key(model, data)
    assert base is not None and key(copy.deepcopy(model), bundle()) == base  # equal contents, other objects
    other_init = fresh_copy(model, torch.Generator().manual_seed(1))
    edited = bundle()
    edited.train_x[0, 0, 0, 0] += 1
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    others = [
        key(other_init, data),
        key(net(width=5), data),
        key(frozen, data),
        key(copy.deepcopy(model).to(memory_format=torch.channels_last), data),
        key(model, edited),
        key(model, random_share(data, 0.5, torch.Generator().manual_seed(0))),
        key(model, replace(data, mean=(0.5,), std=(0.25,))),
        key(model, data, TrainingConfig(epochs=2)),
        key(model, data, TrainingConfig(epochs=1, precision="bf16")),
        key(model, data, None, torch.device("cuda", 0)),
        key(model, data, None, CPU, "merge", 1),
        key(model, data, None, CPU, "merge-naive", 0),
    ]
    assert len({base, *others}) == len(others) + 1


def test_a_stored_model_is_served_as_a_copy_and_the_least_recently_used_dropped(monkeypatch):
    monkeypatch.setattr(thief_models, "CACHE_SIZE", 2)
    trained = []

    def train():
        trained.append(1)
        return net()

    first = thief_models.trained_once("a", train, CPU)
    served = thief_models.trained_once("a", train, CPU)
    assert len(trained) == 1 and served is not first
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), served.state_dict().values()))
    with torch.no_grad():
        served[0].weight.zero_()
    assert thief_models.trained_once("a", train, CPU)[0].weight.abs().sum() > 0
    thief_models.trained_once("b", train, CPU)
    thief_models.trained_once("a", train, CPU)  # "a" used last: "b" goes when "c" comes
    thief_models.trained_once("c", train, CPU)
    assert len(trained) == 3
    thief_models.trained_once("a", train, CPU)
    assert len(trained) == 3
    thief_models.trained_once("b", train, CPU)
    assert len(trained) == 4
    thief_models.trained_once(None, train, CPU)
    thief_models.trained_once(None, train, CPU)
    assert len(trained) == 6


def test_the_strength_free_seed_reads_the_attack_seed_not_the_generator():
    def ctx(rng_seed, attack_seed=None):
        return AttackContext(bundle(), torch.Generator().manual_seed(rng_seed), CPU, attack_seed=attack_seed)

    assert ctx(1, 7).strength_free_seed() == ctx(2, 7).strength_free_seed()
    assert ctx(1, 7).strength_free_seed() != ctx(1, 8).strength_free_seed()
    assert ctx(1, 7).strength_free_seed("a") != ctx(1, 7).strength_free_seed("b")
    assert ctx(1).strength_free_seed() == ctx(1).strength_free_seed() != ctx(2).strength_free_seed()  # by hand: the rng's seed
    drawn = ctx(1)
    torch.randn(3, generator=drawn.rng)
    assert drawn.strength_free_seed() == ctx(1).strength_free_seed()
