"""Attack contracts found broken by a probe of every attack's documented semantics (2026-12-05)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.datasets.decoded import uint8_bundle
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS

CPU = torch.device("cpu")


def uint8_data(n_train: int = 40, n_test: int = 10):
    """A CIFAR-like bundle kept as uint8 (the fast path trains from ``train_u8``, as for cifar10)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return uint8_bundle("u8", (x[:n_train], y[:n_train], x[n_train:], y[n_train:], "d"), None, None, (0.5,) * 3, (0.25,) * 3, 10)


def test_overwrite_on_a_share_of_a_uint8_dataset_trains_on_that_share():
    """The labels were cut to the share and the uint8 images not: IndexError on every CIFAR-10 cell."""
    data = uint8_data()
    model = MODELS.build("small_cnn", {"width": 4, "hidden": 8}).build(data)
    method = METHODS.build("uchida", {"bits": 8})
    ctx = AttackContext(data, torch.Generator().manual_seed(0), CPU, method, None)
    ATTACKS.build("overwrite", {"batch_size": 8, "data_fraction": 0.5}).apply(model, 1.0, ctx)
    assert ctx.effect > 0


def test_fine_prune_never_prunes_the_output_convolution():
    """A fully convolutional classifier (SqueezeNet's, a segmentation head): pruning its last conv
    deleted whole classes; the last feature convolution is pruned instead."""
    data = DATASETS.build("synthetic", {"channels": 3, "size": 8, "n_train": 16, "n_test": 8}).load(None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, data.num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ctx = AttackContext(data, torch.Generator().manual_seed(0), CPU)
    attacked = ATTACKS.build("fine_prune", {"epochs": 0, "probe": 8}).apply(model, 0.5, ctx)
    assert (attacked[2].weight.abs().sum((1, 2, 3)) > 0).all()  # every class keeps its output
    assert int((attacked[0].weight.abs().sum((1, 2, 3)) == 0).sum()) == 4


def test_noise_on_a_single_weight_stays_finite():
    data = DATASETS.build("synthetic", {"channels": 1, "size": 4, "n_train": 4, "n_test": 4}).load(None)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(16, data.num_classes))
    ctx = AttackContext(data, torch.Generator().manual_seed(0), CPU)
    attacked = ATTACKS.build("noise").apply(model, 0.5, ctx)
    assert torch.isfinite(attacked[0].weight).all() and ctx.effect == ctx.effect


def test_key_leak_counts_are_whole_numbers():
    attack = ATTACKS.build("key_leak", {"count": True})
    assert attack.check_strength(2.5) and attack.check_strength(2) is None


@pytest.mark.at_chance("plumbing: counts the null's draws per attack")
def test_null_applies_overwrite_per_method_and_a_key_aware_chain_per_key(tmp_path):
    from wmbench.cli import main

    path = tmp_path / "n.yaml"
    path.write_text(textwrap.dedent("""
        name: nullover
        seeds: [0]
        device: cpu
        datasets: [{name: digits, args: {subset_train: 200, subset_test: 100}}]
        models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
        methods: [none, {name: uchida, args: {bits: 32}}]
        training: {epochs: 1}
        attacks:
          - {name: overwrite, strengths: [1]}
          - {name: chain, label: leak-noise, strengths: [0.5], args: {attacks: [key_leak, {name: noise, strength: 0.1}]}}
    """))
    common = ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main(["null", str(path), "--keys", "3", *common]) == 0
    import pandas as pd

    frame = pd.read_csv(tmp_path / "lb" / "nullover_null.csv")
    rows = frame.set_index("attack")
    assert rows.loc["overwrite", "null_n"] == 9 and rows.loc["leak-noise", "null_n"] == 9
