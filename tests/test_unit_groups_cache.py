"""wmbench.units caches its dependency-graph analysis per model structure: a second model of the same
architecture is served the groups without a second analysis, bound to its own modules; a model whose
forward differs (a flag its repr does not show) or whose shapes differ (dummy units) gets its own."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from test_permute_groupnorm import gn_net
from test_resync import tiny_vit
from torch import nn

from wmbench import units
from wmbench import structured_pruning
from wmbench.units import permute_group, unit_groups

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def analyses(monkeypatch):
    """How many dependency graphs were built (an empty cache to start with)."""
    monkeypatch.setattr(units, "_CACHE", OrderedDict(), raising=False)
    count = [0]
    build = structured_pruning.dependency_graph

    def counted(model, example):
        count[0] += 1
        return build(model, example)

    monkeypatch.setattr(structured_pruning, "dependency_graph", counted)
    return count


class Flagged(nn.Module):
    """Two convolutions and a head; ``residual`` (not in the repr) adds conv1's output to conv2's,
    which couples their channels into one group."""

    def __init__(self, residual: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.residual = residual

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(h))
        if self.residual:
            y = y + h
        return self.head(torch.relu(y).mean((2, 3)))


BUILDERS = {
    "flagged": lambda seed: Flagged(seed=seed).eval(),
    "groupnorm": lambda seed: gn_net(4, seed=seed),
    "vit": tiny_vit,
}


def example(arch: str) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) if arch == "vit" else X


def described(groups, model):
    """The groups by names: each member's name, module path, kind, tensor, axis, positions, tensor
    names and size; each GroupNorm's name, count, channels and positions."""
    paths = {id(m): n for n, m in model.named_modules()}
    return [
        ([(m.name, paths[id(m.module)], m.kind, m.tensor, m.dim, m.pos.tolist(), m.names, m.size) for m in g.members],
         [(n.name, n.groups, n.channels, n.pos.tolist()) for n in g.norms])
        for g in groups
    ]


def fresh_analysis(model, x):
    """The groups of an analysis that cannot have been served from the cache."""
    saved = units._CACHE
    units._CACHE = OrderedDict()
    try:
        return unit_groups(model, x)
    finally:
        units._CACHE = saved


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_a_second_model_of_the_same_architecture_is_served_from_the_cache(arch, analyses):
    first, second = BUILDERS[arch](0), BUILDERS[arch](1)
    x = example(arch)
    groups1, skipped1 = unit_groups(first, x)
    for p in list(second.parameters())[:2]:  # frozen layers are analysed as trainable: the same structure
        p.requires_grad_(False)
    groups2, skipped2 = unit_groups(second, x)
    assert analyses[0] == 1
    assert [p.requires_grad for p in second.parameters()][:3] == [False, False, True]
    assert groups2 and described(groups2, second) == described(groups1, first)
    fresh_groups, fresh_skipped = fresh_analysis(second, x)
    assert (described(groups2, second), skipped2) == (described(fresh_groups, second), fresh_skipped) and skipped1 == skipped2
    if arch == "groupnorm":
        assert any(g.norms for g in groups2)
    modules = {id(m) for m in second.modules()} | {id(p) for p in second.parameters()}
    assert all(id(m.module) in modules for g in groups2 for m in g.members)
    assert all(t is getattr(m.module, k) for g in groups2 for m in g.members for k, t in zip(m.names, m.tensors()))


def test_a_forward_flag_the_repr_does_not_show_gets_its_own_analysis(analyses):
    """A key of repr and parameter names and shapes alone would serve the plain model's groups to
    the residual one, whose conv1 and conv2 channels are one group."""
    plain, residual = Flagged(residual=False), Flagged(residual=True)
    assert repr(plain) == repr(residual)
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in residual.named_parameters()]
    plain_groups, _ = unit_groups(plain.eval(), X)
    residual_groups, _ = unit_groups(residual.eval(), X)
    assert analyses[0] == 2
    assert len(plain_groups) == 2 and len(residual_groups) == 1
    assert {(m.name, m.kind) for m in residual_groups[0].members} >= {("conv1", "out"), ("conv2", "out"), ("conv2", "in"), ("head", "in")}
    assert described(residual_groups, residual) == described(fresh_analysis(residual, X)[0], residual)
    count = analyses[0]
    unit_groups(Flagged(residual=True, seed=1).eval(), X)  # each is cached
    unit_groups(Flagged(residual=False, seed=1).eval(), X)
    assert analyses[0] == count


def test_a_model_grown_by_dummy_units_gets_its_own_analysis(analyses):
    from wmbench.api import AttackContext
    from wmbench.registry import ATTACKS, DATASETS

    data = DATASETS.build("synthetic", {"channels": 3, "size": 16, "n_train": 4, "n_test": 2}).load(None)
    model = Flagged().eval()
    before, _ = unit_groups(model, X)
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    grown = ATTACKS.build("dummy_neurons", {"permute": False}).apply(model, 0.5, ctx)
    count = analyses[0]
    after, _ = unit_groups(grown, X)
    assert analyses[0] == count + 1
    assert [g.units for g in after] == [12, 12] and [g.units for g in before] == [8, 8]
    assert described(after, grown) == described(fresh_analysis(grown, X)[0], grown)


def test_cached_groups_act_on_the_new_model_only(analyses):
    first, second, third = Flagged(seed=0).eval(), Flagged(seed=1).eval(), Flagged(seed=2).eval()
    unit_groups(first, X)
    kept = copy.deepcopy(first.state_dict())
    groups, _ = unit_groups(second, X)
    assert analyses[0] == 1
    assert all(m.module is second.get_submodule(m.name) for g in groups for m in g.members)
    before = copy.deepcopy(second.state_dict())
    perm = torch.arange(8).flip(0)
    for g in groups:
        permute_group(g, perm)
    assert all(torch.equal(v, kept[k]) for k, v in first.state_dict().items())
    assert torch.equal(second.conv1.weight, before["conv1.weight"][perm])
    assert torch.equal(second.head.weight, before["head.weight"][:, perm])
    groups[0].members[0].pos.zero_()  # a caller's edit to its positions stays its own
    third_groups, _ = unit_groups(third, X)
    assert analyses[0] == 1
    assert described(third_groups, third) == described(fresh_analysis(third, X)[0], third)
    assert all(m.module is third.get_submodule(m.name) for g in third_groups for m in g.members)


def test_the_cache_keeps_a_few_structures(analyses, monkeypatch):
    monkeypatch.setattr(units, "CACHE_SIZE", 2, raising=False)

    def net(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2)).eval()

    for width in (4, 5, 6, 6, 5, 4):
        unit_groups(net(width), X)
    assert analyses[0] == 4 and len(units._CACHE) == 2  # 4 was dropped when 6 came in
