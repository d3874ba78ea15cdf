"""permute, dummy_neurons and resync on models normalised by GroupNorm with several groups: the units
of a group coupled to one are permuted within its structure (GroupNorm groups onto GroupNorm groups,
then within them), so the function stays and the weights move; resync puts them back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.detection import detect
from wmbench.registry import ATTACKS, DATASETS, METHODS
from wmbench.resync import resync

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synthetic32():
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 8, "n_test": 8}).load(None)


class GroupNormNet(nn.Module):
    """Two convolutions of 16 channels, each followed by GroupNorm(4, 16) (groups of 4 channels),
    the second on a residual path: one group coupled to both GroupNorms, one to the first only.
    ``groups`` gives the second GroupNorm's count, for several GroupNorms of different counts on one
    unit group; ``hidden`` a hidden Linear layer (no norm) before the head."""

    def __init__(self, classes: int, groups: int = 4, channels: int = 16, hidden: int = 0) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, channels, 3, padding=1), nn.GroupNorm(4, channels)
        self.conv2, self.gn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels)
        self.conv3, self.gn3 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or channels, classes)

    def forward(self, x):
        h = torch.relu(self.gn1(self.conv1(x)))
        h = torch.relu(self.gn2(self.conv2(h)) + h)
        h = torch.relu(self.gn3(self.conv3(h)))
        return self.head(self.fc(h.mean((2, 3))))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """GroupNorm's affine parameters away from (1, 0), so that a misplaced channel shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def gn_net(classes: int, seed: int = 0, groups: int = 4, channels: int = 16, hidden: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomised(GroupNormNet(classes, groups, channels, hidden), seed)


def gn_resnet18(classes: int, seed: int = 0) -> nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return randomised(resnet18(num_classes=classes, norm_layer=lambda c: nn.GroupNorm(32, c)), seed)


MODELS = {"gn_net": gn_net, "gn_resnet18": gn_resnet18}


def attacked(model, name, args, strength, data, seed=0):
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU)
    return ATTACKS.build(name, args).apply(model, strength, ctx), ctx


def moved_from(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per row of ``new``, the row of ``old`` it equals (the nearest)."""
    return (new.flatten(1)[:, None] - old.flatten(1)[None]).abs().sum(-1).argmin(1)


def assert_same_logits(out, model, x):
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(out(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("arch", list(MODELS))
def test_permute_moves_groupnorm_groups_and_keeps_the_logits(arch, synthetic32):
    """Every group was undone before ("12 groups left unpermuted" on the GroupNorm resnet18): a
    random permutation moves channels across GroupNorm groups. Now none is, the logits stay, every
    convolution's rows move, and each GroupNorm's groups are mapped onto its groups."""
    model = MODELS[arch](synthetic32.num_classes)
    out, ctx = attacked(model, "permute", {}, 1.0, synthetic32)
    assert_same_logits(out, model, synthetic32.test_x)
    assert "detect_note" not in ctx.notes, ctx.notes
    assert ctx.effect > 0.9
    modules = dict(model.named_modules())
    convs = [name for name, m in out.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(not torch.equal(out.get_submodule(n).weight, modules[n].weight) for n in convs)
    for name, norm in out.named_modules():
        if isinstance(norm, nn.GroupNorm):
            size = norm.num_channels // norm.num_groups
            perm = moved_from(torch.stack([norm.weight, norm.bias], 1), torch.stack([modules[name].weight, modules[name].bias], 1))
            assert torch.equal(norm.weight, modules[name].weight[perm]) and torch.equal(norm.bias, modules[name].bias[perm]), name
            assert not torch.equal(perm, torch.arange(len(perm))), name
            blocks = (perm // size).view(norm.num_groups, size)
            assert bool((blocks == blocks[:, :1]).all()), f"{name}: a group's channels came from several groups"
    norm = "bn1" if arch == "gn_resnet18" else "gn1"  # conv1's inputs are the image's: its rows moved as its GroupNorm's entries
    perm = moved_from(out.conv1.weight, model.conv1.weight)
    assert torch.equal(out.get_submodule(norm).weight, model.get_submodule(norm).weight[perm])


@pytest.mark.parametrize("groups", [8, 2, 3, 1, 16])
def test_permute_keeps_a_group_under_groupnorms_of_different_counts(groups, synthetic32):
    """GroupNormNet's residual group passes GroupNorm(4) and GroupNorm(``groups``), on 24 channels
    (16 for GroupNorm(16), one channel a group): 8 groups nest in 4's (blocks of 6, cells of 3), 2
    hold 4's (blocks of 12, cells of 6), 3 cut across them (groups of 8 and 6: one block, cells of 6,
    2, 4, 4, 2 and 6 channels), 1 and 16 do not constrain. Each group was undone before; now one
    permutation compatible with both is kept."""
    channels = 16 if groups == 16 else 24
    model = gn_net(synthetic32.num_classes, groups=groups, channels=channels)
    out, ctx = attacked(model, "permute", {}, 1.0, synthetic32)
    assert_same_logits(out, model, synthetic32.test_x)
    assert "detect_note" not in ctx.notes, ctx.notes
    assert not torch.equal(out.conv2.weight, model.conv2.weight)


def test_permute_keeps_groupnorms_without_affine_parameters(synthetic32):
    """A GroupNorm with ``affine=False`` has no tensor to move, so it is no member of the group; its
    groups constrain the permutation all the same (each group was undone before)."""
    torch.manual_seed(0)
    model = GroupNormNet(synthetic32.num_classes).eval()
    for name in ("gn1", "gn2", "gn3"):
        setattr(model, name, nn.GroupNorm(4, 16, affine=False))
    out, ctx = attacked(model, "permute", {}, 1.0, synthetic32)
    assert_same_logits(out, model, synthetic32.test_x)
    assert "detect_note" not in ctx.notes, ctx.notes
    assert not torch.equal(out.conv1.weight, model.conv1.weight) and not torch.equal(out.conv3.weight, model.conv3.weight)


def test_groupnorms_of_one_group_or_one_channel_a_group_are_permuted_as_before(synthetic32):
    """GroupNorm(1, C) and GroupNorm(C, C) constrain nothing: the permutation is the plain
    ``torch.randperm`` of each group, drawn as before (a regression guard, not a fix)."""
    from wmbench.attacks.permute import permute_model
    from wmbench.units import permute_group, unit_groups

    model = gn_net(synthetic32.num_classes, groups=16)
    for name, groups in (("gn1", 1), ("gn3", 16)):
        setattr(model, name, randomised(nn.GroupNorm(groups, 16)))
    x = synthetic32.train_x[:4]
    attacked_copy, manual = copy.deepcopy(model), copy.deepcopy(model)
    result = permute_model(attacked_copy, 1.0, torch.Generator().manual_seed(0), x)
    assert result.undone == 0 and result.moved > 0
    rng = torch.Generator().manual_seed(0)
    groups, _ = unit_groups(manual, x)
    torch.randperm(len(groups), generator=rng)  # permute_model's draw of the groups it takes
    for g in groups:
        permute_group(g, torch.randperm(g.units, generator=rng))
    for name, value in manual.state_dict().items():
        assert torch.equal(attacked_copy.state_dict()[name], value), name

def test_dummy_neurons_permutes_groupnorm_layers_and_grows_the_others(synthetic32):
    """Units added to a GroupNorm layer would join its groups' statistics: those layers keep their
    size and ``detect_note`` counts them; their permutation, which left them in place without a word
    before (permute's undone groups are not dummy_neurons' notes), now moves them within their
    groups. The hidden Linear layer grows."""
    model = gn_net(synthetic32.num_classes, hidden=32)
    out, ctx = attacked(model, "dummy_neurons", {}, 0.5, synthetic32)
    assert_same_logits(out, model, synthetic32.test_x)
    assert out.fc[0].weight.shape[0] == 48 and out.conv1.weight.shape[0] == 16 and out.conv3.weight.shape[0] == 16
    assert "2 GroupNorm layers left at their size (added units would join their groups' statistics)" in ctx.notes["detect_note"]
    for name in ("conv1", "conv3", "gn1", "gn2", "gn3"):
        assert not torch.equal(out.get_submodule(name).weight, model.get_submodule(name).weight), name


def test_dummy_neurons_says_why_a_groupnorm_model_takes_no_units(synthetic32):
    from wmbench.errors import NotApplicable

    with pytest.raises(NotApplicable, match=r"no layer of this model can take added units \(2 GroupNorm layers left at their size"):
        attacked(gn_net(synthetic32.num_classes), "dummy_neurons", {}, 0.5, synthetic32)


@pytest.mark.parametrize("arch", list(MODELS))
def test_resync_restores_a_groupnorm_model_after_permute(arch, synthetic32):
    """Every weight back where the owner's model has it (before, nothing had moved)."""
    model = MODELS[arch](synthetic32.num_classes)
    out, _ = attacked(model, "permute", {}, 1.0, synthetic32)
    assert not torch.equal(out.conv1.weight, model.conv1.weight)
    restored = resync(out, model, synthetic32.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", list(MODELS))
def test_permute_hides_a_watermas_mark_in_a_groupnorm_model_and_resync_finds_it(arch, synthetic32):
    """WaterMAS carriers in the convolutions: plain detection found them after permute (every
    group was undone, nothing moved); now it misses them and resync finds them (r > 0.99)."""
    model = MODELS[arch](synthetic32.num_classes)
    method = METHODS.build("watermas")
    key = method.finalize_key(model, method.keygen(model, synthetic32, torch.Generator().manual_seed(0)))
    assert detect(method, model, key, 1e-6)[3]
    out, _ = attacked(model, "permute", {}, 1.0, synthetic32)
    plain = detect(method, out, key, 1e-6)
    synced = detect(method, out, key, 1e-6, reference=model, example=synthetic32.train_x[:2])
    assert not plain[3] and abs(plain[0]) < 0.3 and synced[3] and synced[0] > 0.99, (plain, synced)


@pytest.mark.parametrize("arch,keys", [("gn_net", 10), ("gn_resnet18", 2)])
def test_resync_creates_no_detection_on_an_independent_groupnorm_model(arch, keys, synthetic32):
    """The null: an independently initialised GroupNorm model, permuted within its GroupNorm groups,
    matched onto an owner's that holds each key's mark, never correlates with it."""
    owner = MODELS[arch](synthetic32.num_classes)
    independent = MODELS[arch](synthetic32.num_classes, seed=1)
    suspect, _ = attacked(independent, "permute", {}, 1.0, synthetic32)
    assert not torch.equal(suspect.conv1.weight, independent.conv1.weight)
    method = METHODS.build("watermas")
    for seed in range(keys):
        key = method.finalize_key(owner, method.keygen(owner, synthetic32, torch.Generator().manual_seed(100 + seed)))
        stat, pvalue, _, detected, _ = detect(method, suspect, key, 1e-6, reference=owner, example=synthetic32.train_x[:2])
        assert not detected and abs(stat) < 0.3, (seed, stat, pvalue)
