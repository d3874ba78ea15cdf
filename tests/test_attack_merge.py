"""merge: the stolen model interpolated with the thief's own, unit-aligned model, BatchNorm reset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import run_scenario, train_small
from wmbench import thief_models
from wmbench.api import AttackContext
from wmbench.attacks.merge import CHECK_IMAGES, align_to
from wmbench.errors import ConfigError, NotApplicable
from wmbench.models import weight_params
from wmbench.registry import ATTACKS, DATASETS, METHODS
from wmbench.scenario import parse_scenario
from wmbench.train import Trainer

CPU = torch.device("cpu")
FAST = {"epochs": 2}


@pytest.fixture(scope="module")
def digits400():
    return DATASETS.build("digits", {"subset_train": 400}).load(None)


@pytest.fixture(scope="module")
def uchida_model(digits):
    return train_small(digits, "uchida")


def context(data, key=None, seed=0, method="watermas"):
    return AttackContext(data, torch.Generator().manual_seed(seed), CPU, METHODS.build(method), key, progress=False)


def merge(model, data, strength, seed=0, **args):
    ctx = context(data, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the worker seeds the global RNG for each cell too
        out = ATTACKS.build("merge", {**FAST, **args}).apply(model, strength, ctx)
    return out, ctx


def thief(model, data, seed=0, **args):
    """The thief's own model as the attack trains it (same generator, same draws), and its share."""
    ctx = context(data, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ATTACKS.build("merge", {**FAST, **args}).own_model(copy.deepcopy(model).requires_grad_(True), ctx)


def same(a, b):
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def bn_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_alpha_zero_is_the_stolen_model_bit_for_bit(watermas_model, digits400):
    model, _ = watermas_model
    out, ctx = merge(model, digits400, 0.0)
    assert same(out, model) and out is not model and ctx.effect == 1.0  # it agrees with itself


def test_alpha_one_with_align_is_the_thiefs_aligned_model_and_holds_no_mark(watermas_model, uchida_model, digits400):
    for (model, key), name in [(watermas_model, "watermas"), (uchida_model, "uchida")]:
        method = METHODS.build(name)
        assert method.detect(model, key).detected(1e-6)
        out, ctx = merge(model, digits400, 1.0)
        own, share = thief(model, digits400)
        aligned = align_to(own, model, share.train_x[:CHECK_IMAGES])
        ours = dict(aligned.named_parameters())
        assert all(torch.equal(p, ours[n]) for n, p in out.named_parameters()), "alpha 1 keeps no stolen weight"
        assert not method.detect(out, key).detected(1e-6), name
        assert 0.0 <= ctx.effect <= 1.0


def test_alignment_keeps_the_thiefs_function_and_moves_its_weights_towards_the_stolen_ones(watermas_model, digits400):
    model, _ = watermas_model
    own, share = thief(model, digits400)
    x = share.train_x[:CHECK_IMAGES]
    aligned = align_to(own, model, x)
    with torch.no_grad():
        before, after = own(x), aligned(x)
    assert torch.allclose(before, after, atol=1e-4 * float(before.abs().max()), rtol=1e-4)
    stolen = weight_params(model)

    def distance(m):
        return sum(float((w - stolen[k]).detach().pow(2).sum()) for k, w in weight_params(m).items()) ** 0.5

    assert distance(aligned) < 0.95 * distance(own)
    assert not same(aligned, own)


def test_batchnorm_statistics_are_re_estimated_on_the_thiefs_data(watermas_model, digits400):
    model, _ = watermas_model
    out, _ = merge(model, digits400, 0.5)
    own, share = thief(model, digits400)
    aligned = align_to(own, model, share.train_x[:CHECK_IMAGES])
    for (mean, var), (m0, v0), (m1, v1) in zip(bn_stats(out), bn_stats(model), bn_stats(aligned)):
        for stat, a, b in [(mean, m0, m1), (var, v0, v1)]:
            assert not torch.allclose(stat, a) and not torch.allclose(stat, b)
            assert not torch.allclose(stat, 0.5 * a + 0.5 * b)  # not the parents' average either
    kept, _ = merge(model, digits400, 0.5, reset_bn=False)  # without the reset: the average
    for (mean, var), (m0, v0), (m1, v1) in zip(bn_stats(kept), bn_stats(model), bn_stats(aligned)):
        assert torch.allclose(mean, 0.5 * m0 + 0.5 * m1) and torch.allclose(var, 0.5 * v0 + 0.5 * v1)


def test_deterministic_per_seed(watermas_model, digits400):
    model, _ = watermas_model
    one, ctx_one = merge(model, digits400, 0.5)
    two, ctx_two = merge(model, digits400, 0.5)
    other, _ = merge(model, digits400, 0.5, seed=1)
    assert same(one, two) and ctx_one.effect == ctx_two.effect
    assert not same(one, other)


def test_units_that_cannot_be_matched_are_not_averaged():
    torch.manual_seed(0)

    def grouped() -> nn.Module:  # a grouped (not depthwise) convolution: its input group has no channel group
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()

    with pytest.raises(NotApplicable, match="cannot be matched"):
        align_to(grouped(), grouped(), torch.randn(8, 1, 8, 8))


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_invalid_strength_refused_at_load(tmp_path, strength):
    doc = {"name": "m", "seeds": [0], "device": "cpu", "datasets": ["digits"], "models": ["small_cnn"], "methods": ["none"],
           "attacks": [{"name": "merge", "strengths": [strength]}]}
    with pytest.raises(ConfigError) as info:
        parse_scenario(doc, tmp_path)
    assert info.value.field == "attacks[0].strengths[0]"


SCENARIO = """
name: merge_tiny
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 200, subset_test: 100}}]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods: [{name: watermas, args: {n_carriers: 128}}]
training: {epochs: 2, batch_size: 50}
attacks:
  - {name: merge, strengths: [0.5], args: {epochs: 1}}
  - {name: merge, label: merge-naive, strengths: [0.5], args: {epochs: 1, align: false}}
"""


@pytest.mark.at_chance("plumbing: merge's rows are written with a p-value and an effect in [0, 1]")
def test_a_watermas_model_merged_through_a_scenario_grid(tmp_path):
    path = tmp_path / "merge_tiny.yaml"
    path.write_text(SCENARIO)
    code, rows = run_scenario(path, tmp_path / "cache")
    assert code == 0
    merged = rows[rows["strength"] == 0.5]
    assert sorted(merged["attack"]) == ["merge", "merge-naive"]
    assert merged["detect_pvalue"].notna().all() and merged["detected"].notna().all()
    assert merged["attack_effect"].between(0, 1).all()


def thief_trainings(monkeypatch) -> list[int]:
    """A list that grows by one at each training of a thief's model (``Trainer.fit`` for merge)."""
    trainings: list[int] = []
    fit = Trainer.fit

    def counted(self, *args, **kwargs):
        if self.desc == "merge":
            trainings.append(1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", counted)
    return trainings


def test_the_thief_is_the_same_at_every_strength_and_against_every_method(watermas_model, uchida_model, digits400, monkeypatch):
    """Trained anew each time (nothing stored): contexts seeded for other strengths, other global
    seeds and another method's stolen model give the same thief and the same share."""
    monkeypatch.setattr(thief_models, "CACHE_SIZE", 0)
    attack = ATTACKS.build("merge", {**FAST, "data_fraction": 0.5})
    thieves = []
    for (model, _), strength_seed in [(watermas_model, 11), (watermas_model, 12), (uchida_model, 13)]:
        ctx = AttackContext(digits400, torch.Generator().manual_seed(strength_seed), CPU, METHODS.build("watermas"), progress=False, attack_seed=5)
        with torch.random.fork_rng():
            torch.manual_seed(strength_seed)  # the worker seeds the global generators from the strength too
            thieves.append(attack.own_model(copy.deepcopy(model).requires_grad_(True), ctx))
    (own, share), *others = thieves
    for other, other_share in others:
        assert same(own, other)
        assert torch.equal(share.train_x, other_share.train_x) and torch.equal(share.train_y, other_share.train_y)
    assert len(share.train_x) == len(digits400.train_x) // 2
    other_seed = AttackContext(digits400, torch.Generator().manual_seed(11), CPU, progress=False, attack_seed=6)
    assert not same(own, attack.own_model(copy.deepcopy(watermas_model[0]), other_seed)[0])


def test_a_stored_thief_gives_what_a_new_training_gives(watermas_model, uchida_model, digits400, monkeypatch):
    """The second method's merge is served the thief trained for the first one; its merged model,
    effect and share are those of a process that trains the thief for it."""
    trainings = thief_trainings(monkeypatch)
    thief_models.clear()
    args = {"data_fraction": 0.5}
    merge(watermas_model[0], digits400, 0.5, **args)
    served, served_ctx = merge(uchida_model[0], digits400, 0.75, **args)
    _, served_share = thief(uchida_model[0], digits400, **args)
    assert len(trainings) == 1
    thief_models.clear()
    trained, trained_ctx = merge(uchida_model[0], digits400, 0.75, **args)
    assert len(trainings) == 2
    thief_models.clear()
    _, trained_share = thief(uchida_model[0], digits400, **args)
    assert same(served, trained) and served_ctx.effect == trained_ctx.effect
    assert torch.equal(served_share.train_x, trained_share.train_x) and torch.equal(served_share.train_y, trained_share.train_y)


def test_a_served_thief_is_a_copy(watermas_model, digits400):
    thief_models.clear()
    own, _ = thief(watermas_model[0], digits400)
    with torch.no_grad():
        for p in own.parameters():
            p.zero_()
    again, _ = thief(watermas_model[0], digits400)
    assert any(bool(p.abs().sum()) for p in again.parameters())


GRID = """
name: merge_shared
seeds: [0, 1]
device: cpu
datasets: [{name: digits, args: {subset_train: 200, subset_test: 100}}]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods: [none, {name: watermas, args: {n_carriers: 128}}]
training: {epochs: 1, batch_size: 50}
attacks:
  - {name: merge, strengths: [0.5, 1.0], args: {epochs: 1}}
  - {name: merge, label: merge-naive, strengths: [0.5, 1.0], args: {epochs: 1, align: false}}
"""


@pytest.mark.at_chance("plumbing: counts the thieves trained; at alpha 1 both methods read the thief's own error")
def test_a_grid_trains_one_thief_per_seed(tmp_path, monkeypatch):
    """2 seeds x 2 entries x 2 methods x 2 alphas: 2 thieves trained, not 16 (the naive control
    faces the aligned arm's thief: a paired comparison); at alpha 1 without alignment the merged
    model is the thief's own (BatchNorm reset on its data), so both methods read the same error."""
    trainings = thief_trainings(monkeypatch)
    thief_models.clear()
    path = tmp_path / "merge_shared.yaml"
    path.write_text(GRID)
    code, rows = run_scenario(path, tmp_path / "cache")
    assert code == 0
    assert len(trainings) == 2
    own = rows[(rows["attack"] == "merge-naive") & (rows["strength"] == 1.0)]
    assert len(own) == 4 and (own.groupby("seed")["error"].nunique() == 1).all()
