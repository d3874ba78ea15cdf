"""Model structures nobody had run (found by probing plug-in models, 2026-12-06): each one is either
measured as it should be or refused before any training with one line naming the problem, never a
row measured for the wrong reason or a crash after the training."""

from __future__ import annotations

import pytest
import torch
from conftest import plugin_scenario, run_scenario
from torch import nn

from wmbench.api import AttackContext
from wmbench.attacks.distill import fresh_copy
from wmbench.errors import ConfigError
from wmbench.model_checks import check_runs
from wmbench.registry import ATTACKS, METHODS

CPU = torch.device("cpu")


def small(data, norm: bool = True) -> nn.Sequential:
    """small_cnn's layout at width 8 (BatchNorm or none)."""
    bn = (lambda w: nn.BatchNorm2d(w)) if norm else (lambda w: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(data.in_channels, 8, 3, padding=1, bias=False), bn(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), bn(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, data.num_classes))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # the old hook, on purpose
@pytest.mark.parametrize("wrap", [torch.nn.utils.parametrizations.weight_norm, torch.nn.utils.parametrizations.spectral_norm,
                                  torch.nn.utils.weight_norm])
def test_a_parametrized_weight_is_refused_before_training(digits, wrap):
    """Its ``weight`` is recomputed from other tensors at every forward: a mark or an attack written
    into it was lost (quantize ran and changed nothing), keys named tensors the model lacks."""
    model = small(digits)
    model[3] = wrap(model[3])
    with pytest.raises(ConfigError, match=r"3\.weight is computed from other tensors .*remove_parametrizations"):
        check_runs(model, digits)


class EvalTuple(nn.Module):
    def __init__(self, data):
        super().__init__()
        self.net = small(data)

    def forward(self, x):
        y = self.net(x)
        return y if self.training else (y, y)


def test_a_model_returning_a_tuple_in_eval_mode_is_refused_before_training(digits):
    """It trained, then every cell failed at evaluation ('tuple' object has no attribute 'argmax')."""
    with pytest.raises(ConfigError, match="in eval mode the model returns tuple, not a tensor of logits"):
        check_runs(EvalTuple(digits), digits)


def test_a_model_that_cannot_take_the_data_s_float32_inputs_is_refused_before_training(digits):
    with pytest.raises(ConfigError, match="in eval mode the model fails on digits inputs of dtype torch.float32 .*Double"):
        check_runs(small(digits).double(), digits)


STRUCTURES = '''
from dataclasses import dataclass

import torch
from torch import nn

from wmbench.models import Model
from wmbench.registry import MODELS


class Float64Net(nn.Module):
    """float32 in and out, float64 inside."""

    def __init__(self, data):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(data.in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(32, data.num_classes)).double()

    def forward(self, x):
        return self.net(x.double()).float()


@MODELS.register("float64_net")
@dataclass(frozen=True)
class Float64Model(Model):
    def build(self, data):
        return Float64Net(data)
'''


def test_a_float64_model_is_measured_not_failed_after_training(tmp_path):
    """Every attack cell failed: the attacked copy was cast to float32 as if the attack had lowered
    its precision, and the model then got float32 where it computes in float64; deepsigns's
    training failed (its float32 projections times float64 activations)."""
    plugin = tmp_path / "structures.py"
    plugin.write_text(STRUCTURES)
    path = plugin_scenario(tmp_path, plugin, "{name: none, args: {n_carriers: 64}}, {name: watermas, args: {n_carriers: 64}}, {name: deepsigns, args: {bits: 8, triggers: 4}}", models="float64_net",
                           attacks="{name: noise, strengths: [0.1]}, {name: quantize, strengths: [4]}")
    code, rows = run_scenario(path, tmp_path / "c")
    assert code == 0 and rows["failure"].isna().all(), rows["failure"].dropna().tolist()
    assert not rows["detect_note"].astype("string").str.contains("evaluated in", na=False).any()
    assert rows[rows.method == "watermas"].detected.all()


def frozen_front(data) -> nn.Sequential:
    """``small`` with its two convolutions and their BatchNorms frozen (requires_grad off)."""
    model = small(data)
    for i in (0, 1, 3, 4):
        model[i].requires_grad_(False)
    return model


def test_frozen_layers_are_in_the_unit_groups(digits):
    """torch-pruning traces through autograd: layers whose weights need no gradient were missing
    from its graph, and permute, structured prune, dummy_neurons and resync (which analyses the
    owner's model as it is) left them in place without a word."""
    from wmbench.units import unit_groups

    model = frozen_front(digits).eval()
    groups, skipped = unit_groups(model, digits.train_x[:4])
    assert {g.members[0].name for g in groups} >= {"0", "3"} and skipped == 0
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 4  # the owner's flags kept


@pytest.mark.parametrize("name,args", [("finetune", {"batch_size": 50}), ("distill", {"batch_size": 50, "epochs": 1})])
def test_retraining_attacks_train_the_frozen_layers_too(digits, name, args):
    """requires_grad is the owner's training choice, not part of the weights a thief holds: fine-tuning
    left a frozen backbone (and a mark written there) bit for bit as it was, and distillation
    re-initialised it and never trained it."""
    model = frozen_front(digits).eval()
    ctx = AttackContext(digits, torch.Generator().manual_seed(0), CPU, progress=False)
    attacked = ATTACKS.build(name, args).apply(model, 1.0, ctx)
    assert all(p.requires_grad for p in attacked.parameters())
    assert not model[0].weight.requires_grad  # the owner's model as it was
    # moved from the trained weights (finetune), and from the re-drawn ones (distill: it trained them)
    start = model[0].weight if name == "finetune" else fresh_copy(model, torch.Generator().manual_seed(0))[0].weight
    assert not torch.equal(attacked[0].weight, start)


@pytest.mark.parametrize("method", ["uchida", "greedy_residuals"])
def test_a_training_based_mark_in_a_frozen_layer_is_refused(digits, method):
    """Its loss cannot move a frozen weight: the mark was never embedded, and every row read 'removed'."""
    with pytest.raises(ConfigError, match=r"layer: '3' is frozen \(requires_grad off\)"):
        METHODS.build(method, {"layer": "3", "bits": 32}).keygen(frozen_front(digits), digits, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["uchida", "greedy_residuals"])
def test_a_mark_in_a_tied_weight_names_the_parameter_the_model_lists(digits, method):
    """Two Linear layers sharing one weight: the key named the second layer's, which
    ``named_parameters`` lists under the first name, and the training failed ('no tensor of that name')."""
    first, second = nn.Linear(64, 64), nn.Linear(64, 64)
    second.weight = first.weight
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), first, nn.ReLU(), second, nn.ReLU(), nn.Linear(64, digits.num_classes))
    m = METHODS.build(method, {"layer": "5", "bits": 32})
    key = m.keygen(model, digits, torch.Generator().manual_seed(0))
    assert key.meta["param"] == "3.weight"
    m.step_fn(model, key)  # finds its weight
    assert 0.0 <= m.detect(model, key).stat <= 1.0


class Tokens(nn.Module):
    """A bare parameter (a class token) beside a layer: its size is not in the module's repr."""

    def __init__(self, tokens: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(tokens, 8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(x.flatten(1)[:, :8] + self.token.sum(0))


def test_liveness_tells_apart_models_whose_repr_is_the_same():
    """Cached by the repr alone, the second model got the first one's shapes (torchvision's vit_b_16
    at image_size 32 and 64 print the same, their pos_embedding holds 5 and 17 tokens): a carrier
    of a carriers_scope 'all' mark (tartaglione's default) could be drawn outside its tensor."""
    from wmbench.liveness import live_map

    assert repr(Tokens(2)) == repr(Tokens(5))
    assert live_map(Tokens(2), (1, 8, 8)).shapes["token"] == (2, 8)
    assert live_map(Tokens(5), (1, 8, 8)).shapes["token"] == (5, 8)
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(10))  # shapes known after the first forward
    assert live_map(lazy, (1, 8, 8)).shapes["0.weight"] == (4, 1, 3, 3)


class RunningInput(nn.Module):
    """A running mean of the inputs kept in a non-persistent buffer, updated in training."""

    def __init__(self, data):
        super().__init__()
        self.net = small(data)
        self.register_buffer("mean", torch.zeros(1, data.in_channels, 1, 1), persistent=False)

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.mean((0, 2, 3), keepdim=True))
        return self.net(x - self.mean)


def test_a_non_persistent_buffer_that_training_changes_is_refused_before_training(digits):
    """The checkpoint lost it: the training failed once done, its model read back as another function."""
    model = RunningInput(digits)
    with pytest.raises(ConfigError, match="in train mode the model changes its non-persistent buffer mean"):
        check_runs(model, digits)
    assert not model.mean.any()  # left as it was
    model.register_buffer("mean", torch.zeros(1, digits.in_channels, 1, 1))  # persistent: fine
    check_runs(model, digits)


class MonteCarloDropout(nn.Module):
    """Dropout kept on in eval mode."""

    def __init__(self, data):
        super().__init__()
        self.net = small(data)

    def forward(self, x):
        return self.net[-1](nn.functional.dropout(self.net[:-1](x), 0.5, training=True))


def test_a_model_random_in_eval_mode_is_refused_before_training(digits):
    """Its errors differed by chance, and permute, dummy_neurons and resync were undone as if they
    had changed the function (the mark then 'survived' them)."""
    with pytest.raises(ConfigError, match="in eval mode the model's outputs change from one forward to the next"):
        check_runs(MonteCarloDropout(digits), digits)
