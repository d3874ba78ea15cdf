"""The scale attack keeps the function exactly; plain Pearson detection suffers, aligned does not."""

from __future__ import annotations

import pytest
import torch

from wmbench.api import AttackContext
from wmbench.attacks.scale import coupled_layers
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic32():
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 16, "n_test": 8}).load(None)


def scaled(model, strength: float, data, negate: bool = False, seed: int = 0):
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU)
    return ATTACKS.build("scale", {"negate": negate}).apply(model, strength, ctx), ctx


# (architecture, expected BN-rule pairs, expected ReLU-rule pairs, dtype: float32 keeps vgg16 quick,
# the coverage detect_note gives: None where 99% or more of the Conv/Linear weights are rescaled)
ARCHS = [
    ("small_cnn", 2, 1, torch.float64, None),
    ("resnet18", 20, 0, torch.float64, None),  # all but fc: 99.98%
    ("vgg16", 0, 15, torch.float32, None),  # 12 conv pairs (across max-pooling), conv-flatten-linear, 2 linear
    # ReLU rule: the squeeze-excitation fc1 -> fc2; the classifier (Hardswish) is not rescaled
    ("mobilenet_v3_small", 34, 9, torch.float64, "scale: 60.6% of the Conv/Linear weights rescaled (52 of 54 weight tensors"),
]


@pytest.mark.parametrize("arch,n_bn,n_relu,dtype,note", ARCHS)
def test_scale_keeps_the_logits(arch, n_bn, n_relu, dtype, note, synthetic32):
    torch.manual_seed(0)
    model = MODELS.build(arch).build(synthetic32).to(dtype)
    model.train()
    with torch.no_grad():
        if n_bn:
            for _ in range(2):
                model(synthetic32.train_x.to(dtype))  # BN running statistics away from (0, 1)
    model.eval()
    bn, relu = coupled_layers(model)
    assert (len(bn), len(relu)) == (n_bn, n_relu)
    x = synthetic32.test_x.to(dtype)
    with torch.no_grad():
        reference = model(x)
        for negate in (False, True):
            attacked, ctx = scaled(model, 1.0, synthetic32, negate)
            assert 0.4 < ctx.effect < 0.6  # mean |log a| of U(-1, 1)
            if note is None:
                assert "detect_note" not in ctx.notes
            else:
                assert ctx.notes["detect_note"].startswith(note), ctx.notes["detect_note"]
            moved = sum(float((p - q).abs().sum()) for p, q in zip(attacked.parameters(), model.parameters()))
            assert moved > 0
            out = attacked(x)
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_scale_negate_flips_signs(synthetic32):
    torch.manual_seed(0)
    model = MODELS.build("small_cnn").build(synthetic32).eval()
    attacked, _ = scaled(model, 0.5, synthetic32, negate=True)
    ratio = attacked[0].weight.detach().flatten(1)[:, 0] / model[0].weight.detach().flatten(1)[:, 0]
    assert bool((ratio < 0).any()) and bool((ratio > 0).any())


def test_aligned_detection_survives_scale(watermas_model, digits):
    model, key = watermas_model  # small_cnn trained with WaterMAS on digits (conftest)
    plain, aligned = METHODS.build("watermas"), METHODS.build("watermas", {"align": True})
    # on an unscaled model, align changes nothing
    assert aligned.detect(model, key).stat == pytest.approx(plain.detect(model, key).stat, abs=1e-6)
    for strength in (1.0, 3.0):
        attacked, _ = scaled(model, strength, digits)
        assert plain.detect(attacked, key).stat < 0.9
        assert aligned.detect(attacked, key).stat > 0.99


class SharedStatistics(torch.nn.Module):
    """One BatchNorm without learnable scale (buffers only) after two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.fc = torch.nn.BatchNorm2d(8, affine=False), torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.bn(self.c2(x))).mean((2, 3)))


class PoolAfterLinear(torch.nn.Module):
    """A 1-D pool over a Linear's features: it mixes units that carry different factors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.pool, self.fc2 = torch.nn.Linear(64, 32), torch.nn.AvgPool1d(3, stride=1, padding=1), torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.pool(torch.relu(self.fc1(torch.flatten(x, 1)))))


@pytest.mark.parametrize("model_class", [SharedStatistics, PoolAfterLinear])
@pytest.mark.parametrize("negate", [False, True])
def test_scale_leaves_alone_what_it_cannot_rescale_exactly(model_class, negate, digits):
    """A BatchNorm's statistics shared by two layers were rescaled twice, and a pool after a Linear
    was taken for a per-channel op: the logits moved by 0.1-0.9 with no note."""
    torch.manual_seed(0)
    model = model_class().double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
    x = digits.test_x[:16].double()
    attacked, _ = scaled(model, 2.0, digits, negate=negate)
    with torch.no_grad():
        assert torch.allclose(attacked(x), model(x), atol=1e-10)


class MostlyUncoupled(torch.nn.Module):
    """One convolution a BatchNorm follows, then layers no rule couples (a sigmoid between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)  # 36 weights
        self.c2, self.fc = torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.Linear(32, 10)  # 1152 + 320

    def forward(self, x):
        return self.fc(torch.sigmoid(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3)))


def test_scale_says_what_share_of_the_weights_it_rescaled(digits):
    """squeezenet1_1 (its concatenations) had 0.4% of its weights rescaled, and its row said effect 0.50
    with no note: a mark read as surviving "scale" that scale had barely touched. The effect stays the
    mean |log a| of the rescaled channels; detect_note gives the share, as permute's does."""
    torch.manual_seed(0)
    model = MostlyUncoupled().double().eval()
    model.bn.running_var.uniform_(0.5, 1.5)
    x = digits.test_x[:16].double()
    for negate in (False, True):
        attacked, ctx = scaled(model, 1.0, digits, negate=negate)
        assert 0.3 < ctx.effect < 0.7  # 4 channels of U(-1, 1)
        assert ctx.notes["detect_note"] == (
            "scale: 2.4% of the Conv/Linear weights rescaled (1 of 3 weight tensors; "
            "the others have no function-preserving coupling and stay unchanged)")
        assert not torch.equal(attacked.c1.weight, model.c1.weight) and torch.equal(attacked.c2.weight, model.c2.weight)
        with torch.no_grad():
            assert torch.allclose(attacked(x), model(x), atol=1e-10)
