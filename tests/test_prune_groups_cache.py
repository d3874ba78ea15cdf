"""Structured prune caches its channel-group analysis per model structure (wmbench.prune_groups): a
second model of the same architecture is pruned from the stored groups, bound to its own dependency
graph, exactly as a fresh analysis prunes it; a model whose forward couples other channels (a flag
its repr does not show) gets its own analysis."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from test_resync import tiny_vit
from test_unit_groups_cache import Flagged

from wmbench import prune_groups
from wmbench.api import AttackContext
from wmbench import structured_pruning
from wmbench.errors import NotApplicable
from wmbench.registry import ATTACKS, DATASETS, MODELS


@pytest.fixture(scope="module")
def data():
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 4, "n_test": 2}).load(None)


@pytest.fixture
def analyses(monkeypatch):
    """How many channel-group analyses ran (an empty cache to start with)."""
    monkeypatch.setattr(prune_groups, "_CACHE", OrderedDict())
    count = [0]
    analyse = structured_pruning.channel_groups

    def counted(graph, ignored):
        count[0] += 1
        return analyse(graph, ignored)

    monkeypatch.setattr(structured_pruning, "channel_groups", counted)
    return count


def small_cnn(seed: int, data) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.build("small_cnn").build(data).eval()


def mobilenet(seed: int, data) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS.build("mobilenet_v3_small").build(data).eval()


BUILDERS = {
    "flagged": lambda seed, data: Flagged(residual=True, seed=seed).eval(),
    "small_cnn": small_cnn,
    "mobilenet_v3_small": mobilenet,  # depthwise convolutions, squeeze-excitation
    "vit": lambda seed, data: tiny_vit(seed),  # class token and position embedding: bare parameters
}
CONFIGS = [{"scope": scope, "remove": remove} for scope in ("layer", "global") for remove in (False, True)]


def pruned(model, config, strength, data):
    """The pruned model's state and what the attack reported."""
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    attacked = ATTACKS.build("prune", {"mode": "structured", **config}).apply(model, strength, ctx)
    return attacked.state_dict(), ctx.effect, dict(ctx.notes)


def fresh(model, config, strength, data):
    """``pruned`` from an analysis that cannot have been served from the cache."""
    saved = prune_groups._CACHE
    prune_groups._CACHE = OrderedDict()
    try:
        return pruned(model, config, strength, data)
    finally:
        prune_groups._CACHE = saved


def assert_same(one, other) -> None:
    (state, effect, notes), (other_state, other_effect, other_notes) = one, other
    assert list(state) == list(other_state)
    assert all(torch.equal(state[k], other_state[k]) for k in state)
    assert (effect, notes) == (other_effect, other_notes)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_a_second_model_is_pruned_from_the_cache_as_a_fresh_analysis_prunes_it(arch, data, analyses):
    first, second = BUILDERS[arch](0, data), BUILDERS[arch](1, data)
    pruned(first, CONFIGS[0], 0.3, data)
    assert analyses[0] == 1
    for config in CONFIGS:
        for strength in (0.3, 0.6):
            count = analyses[0]
            try:
                pruned(first, config, strength, data)
            except NotApplicable as exc:  # remove on the ViT breaks its forward: the same error either way
                with pytest.raises(NotApplicable, match=re.escape(str(exc).split(" (")[0])):
                    pruned(second, config, strength, data)
                continue
            cached = pruned(second, config, strength, data)
            assert analyses[0] == count  # every configuration, seed and strength: served from the cache
            assert_same(cached, fresh(second, config, strength, data))
    (skipped, stored), = prune_groups._CACHE.values()
    plain = (str, int, type(None), tuple)  # names, places and indices: no module, parameter or graph node is kept
    assert all(isinstance(getattr(item, f), plain) for group in stored for item in group for f in ("source", "edge", "target", "pruning"))
    assert all(type(getattr(item, f)) in (torch.Tensor, tuple) for group in stored for item in group for f in ("idxs", "root_idxs"))
    assert all(item.handler is None or not isinstance(item.handler.__self__, torch.nn.Module) for group in stored for item in group)


class Scaled(torch.nn.Module):
    """Two layers, each followed by a bare per-unit scale of one shape (as ConvNeXt's layer_scale,
    Swin's position bias tables): torch-pruning numbers such parameters in an order of their ids."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.head = torch.nn.Linear(3, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
        self.scale1, self.scale2 = (torch.nn.Parameter(torch.rand(8) + 0.5) for _ in range(2))

    def forward(self, x):
        h = torch.relu(self.fc1(x.mean((2, 3)))) * self.scale1
        return self.head(torch.relu(self.fc2(h)) * self.scale2)


def test_bare_parameters_of_one_shape_are_bound_by_their_names(data, analyses, monkeypatch):
    """torch-pruning's numbers (``UnwrappedParameter_0``) follow the parameters' ids, so they may
    differ between two models: here every other graph numbers them in reverse."""
    import torch_pruning as tp

    detect = tp.DependencyGraph._detect_unwrapped_parameters
    graphs = [0]

    def in_id_order(graph, unwrapped):
        names, found = detect(graph, unwrapped)
        graphs[0] += 1
        return names, found[::-1] if graphs[0] % 2 else found

    monkeypatch.setattr(tp.DependencyGraph, "_detect_unwrapped_parameters", in_id_order)
    models = [Scaled(seed).eval() for seed in range(4)]
    pruned(models[0], {}, 0.5, data)
    for model in models[1:]:
        cached = pruned(model, {}, 0.5, data)
        assert_same(cached, fresh(model, {}, 0.5, data))
        state = cached[0]
        for layer, scale in (("fc1", "scale1"), ("fc2", "scale2")):
            zero = state[f"{layer}.weight"].abs().sum(1) == 0
            assert zero.sum() == 4 and torch.equal(state[scale] == 0, zero)
    assert analyses[0] == len(models)  # the one stored, and a fresh one for each other model


def test_skipped_groups_are_cached_with_their_count(data, analyses, monkeypatch):
    """A group whose index mapping explodes is skipped and said in the note, from the cache as fresh."""
    monkeypatch.setattr(structured_pruning, "INDEX_LIMIT", 100)  # small_cnn's conv -> flatten -> linear: 128 indices
    pruned(small_cnn(0, data), {}, 0.5, data)
    cached = pruned(small_cnn(1, data), {}, 0.5, data)
    assert analyses[0] == 1
    assert cached[2]["detect_note"] == "1 of 3 channel groups left unpruned (torch-pruning cannot analyse them)"
    assert_same(cached, fresh(small_cnn(1, data), {}, 0.5, data))


def test_a_forward_flag_the_repr_does_not_show_gets_its_own_analysis(data, analyses):
    """Keyed by repr and parameter shapes alone, the residual model would be pruned with the plain
    one's groups, where conv1 and conv2 are pruned apart; its own couple them."""
    plain, residual = Flagged(residual=False).eval(), Flagged(residual=True).eval()
    assert repr(plain) == repr(residual)
    plain_state = pruned(plain, {}, 0.5, data)[0]
    residual_pruned = pruned(residual, {}, 0.5, data)
    assert analyses[0] == 2
    assert_same(residual_pruned, fresh(residual, {}, 0.5, data))

    def zero_rows(state, name):
        return set((state[f"{name}.weight"].flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist())

    state = residual_pruned[0]
    assert zero_rows(state, "conv1") == zero_rows(state, "conv2") and len(zero_rows(state, "conv1")) == 4
    assert zero_rows(plain_state, "conv1") != zero_rows(plain_state, "conv2")
    count = analyses[0]
    pruned(Flagged(residual=False, seed=1).eval(), {}, 0.5, data)  # each is cached
    pruned(Flagged(residual=True, seed=1).eval(), {}, 0.5, data)
    assert analyses[0] == count


def test_the_cache_keeps_a_few_structures(data, analyses, monkeypatch):
    monkeypatch.setattr(prune_groups, "CACHE_SIZE", 2)

    def net(width: int) -> torch.nn.Module:
        layers = [torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 2)).eval()

    for width in (4, 5, 6, 6, 5, 4):
        pruned(net(width), {}, 0.5, data)
    assert analyses[0] == 4 and len(prune_groups._CACHE) == 2  # 4 was dropped when 6 came in
