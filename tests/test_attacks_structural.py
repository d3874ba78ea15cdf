"""permute, dummy_neurons and chain keep the function on every registered classifier, are deterministic,
work on a copy and are the identity at strength 0."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wmbench.api import AttackContext
from wmbench.errors import ConfigError
from wmbench.registry import ATTACKS, DATASETS, MODELS
from wmbench.scenario import parse_scenario

CPU = torch.device("cpu")
LFEA = {"attacks": [{"name": "permute", "strength": 1.0}, {"name": "scale", "args": {"negate": True}}]}


@pytest.fixture(scope="module")
def synthetic32():
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 8, "n_test": 8}).load(None)


@pytest.fixture(scope="module")
def models(synthetic32):
    """Built on the meta device and filled with random values (torchvision's initialisation of
    vgg16's 120M weights is slow on a CPU; the function-preservation property does not need it)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            with torch.device("meta"):
                model = MODELS.build(arch).build(synthetic32)
            model.to_empty(device="cpu")
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                    if name.endswith("running_var"):
                        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                    elif t.is_floating_point():
                        fan = t[0].numel() if t.dim() > 1 else 1
                        t.copy_(torch.randn(t.shape, generator=g) / fan**0.5)
            cache[arch] = model.eval()
        return cache[arch]

    return get


def attacked(model, name, args, strength, data, seed=0):
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU)
    return ATTACKS.build(name, args).apply(model, strength, ctx), ctx


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


ARCHS = ["small_cnn", "resnet18", "mobilenet_v3_small", "vgg16"]
CIFAR_ARCHS = ["cifar_speednet", "resnet18_cifar"]
CASES = [
    *[("permute", {}, 1.0, arch) for arch in ARCHS + CIFAR_ARCHS],
    *[("dummy_neurons", {}, 0.5, arch) for arch in ARCHS[:3]],
    ("dummy_neurons", {"permute": False}, 0.05, "vgg16"),  # 4096-unit layers of 25088 inputs: growth only, permute above
    ("chain", LFEA, 1.0, "small_cnn"),
    ("chain", LFEA, 1.0, "mobilenet_v3_small"),
]


@pytest.mark.parametrize("name,args,strength,arch", CASES)
def test_function_kept_on_a_copy(name, args, strength, arch, models, synthetic32):
    model = models(arch)
    before = state(model)
    x = synthetic32.test_x
    with torch.no_grad():
        reference = model(x)
        out, ctx = attacked(model, name, args, strength, synthetic32)
        logits = out(x)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert ctx.effect > 0
    after = out.state_dict()
    changed = [k for k, v in before.items() if after[k].shape != v.shape or not torch.equal(after[k], v)]
    assert changed, "the attack changed nothing"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the original was modified"


@pytest.mark.parametrize("name,args", [("permute", {}), ("dummy_neurons", {}), ("chain", LFEA)])
def test_identity_at_zero_and_deterministic(name, args, models, synthetic32):
    model = models("small_cnn")
    zero, ctx = attacked(model, name, args, 0.0, synthetic32)
    assert ctx.effect == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in zero.state_dict().items())
    one, _ = attacked(model, name, args, 0.5, synthetic32, seed=3)
    two, _ = attacked(model, name, args, 0.5, synthetic32, seed=3)
    other, _ = attacked(model, name, args, 0.5, synthetic32, seed=4)
    assert all(torch.equal(v, two.state_dict()[k]) for k, v in one.state_dict().items())
    assert any(v.shape != other.state_dict()[k].shape or not torch.equal(v, other.state_dict()[k]) for k, v in one.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS + CIFAR_ARCHS)
def test_permute_moves_every_group_but_the_classifier(arch, models, synthetic32):
    _, ctx = attacked(models(arch), "permute", {}, 1.0, synthetic32)
    assert "detect_note" not in ctx.notes  # no group had to be put back: none of them was the classifier's


def test_the_classifier_is_found_behind_a_scaled_output(models, synthetic32):
    from wmbench.structured_pruning import output_layers

    model = models("cifar_speednet")  # returns head(x) * head_scale: no layer's output is the model's
    for i in range(20):  # an id of a freed intermediate tensor used to match the output about half the time
        assert output_layers(model, synthetic32.test_x[i % 8 :][:2]) == [model.head]


def test_permute_strength_is_the_share_of_layers(models, synthetic32):
    model = models("resnet18")
    half, _ = attacked(model, "permute", {}, 0.5, synthetic32)
    moved = {k.rpartition(".")[0] for k, v in half.state_dict().items() if v.dim() == 4 and not torch.equal(v, model.state_dict()[k])}
    convs = {k.rpartition(".")[0] for k, v in model.state_dict().items() if v.dim() == 4}
    assert 0 < len(moved) < len(convs)


def test_dummy_neurons_grow_the_layers(models, synthetic32):
    model = models("small_cnn")
    out, ctx = attacked(model, "dummy_neurons", {"permute": False}, 1.0, synthetic32)
    assert out[0].weight.shape[0] >= 2 * model[0].weight.shape[0]
    assert out[3].weight.shape[1] == out[0].weight.shape[0]
    assert ctx.effect >= 1.0 and "shapes changed" in ctx.notes["detect_note"]


def test_chain_is_validated_at_load():
    doc = {
        "name": "t", "datasets": ["digits"], "models": ["small_cnn"], "methods": ["none"],
        "attacks": [{"name": "chain", "strengths": [1.0], "args": {"attacks": ["permute", {"name": "scal"}]}}],
    }
    with pytest.raises(ConfigError, match="scal.*did you mean: scale"):
        parse_scenario(doc, None)
    doc["attacks"][0]["args"]["attacks"] = ["permute", {"name": "scale", "strength": -1}]
    with pytest.raises(ConfigError, match="strength"):
        parse_scenario(doc, None)
    doc["attacks"][0]["args"]["attacks"] = [{"name": "permute", "strength": 1.0}, "scale"]
    doc["attacks"][0]["strengths"] = [2.0]
    scenario = parse_scenario(doc, None)
    assert scenario.attacks[0].attack.name == "chain"
    doc["attacks"][0]["args"]["attacks"] = ["permute", "scale"]  # permute at the chain's strength 2: out of range
    with pytest.raises(ConfigError, match="permute"):
        parse_scenario(doc, None)


def test_a_chain_says_which_step_each_note_is_about(models, synthetic32):
    model = models("small_cnn")
    _, ctx = attacked(model, "chain", {"attacks": ["permute", {"name": "dummy_neurons", "args": {"permute": False}}]}, 1.0, synthetic32)
    assert ctx.notes["detect_note"].startswith("step 2 (dummy_neurons): ") and "shapes changed" in ctx.notes["detect_note"]


def test_a_chain_element_error_names_its_full_path(tmp_path):
    """attacks[0].args.attacks[1].args.foo, not 'attacks[0].args: attacks[1].args.foo: ...'."""
    from wmbench.errors import ConfigError
    from wmbench.scenario import load_scenario

    path = tmp_path / "c.yaml"
    path.write_text("name: c\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [watermas]\n"
                    "attacks: [{name: chain, strengths: [1.0], args: {attacks: [permute, {name: noise, args: {foo: 1}}]}}]\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert info.value.field == "attacks[0].args.attacks[1].args.foo" and info.value.message.startswith("unknown field"), str(info.value)


def _cancelling_net() -> torch.nn.Module:
    """Every channel of the permuted group carries 1e4 and each consumer row's weights (+-1) sum to
    0, so its float32 output (about 1) depends on the summation order by ulp(1e4) = 1e-3, beyond
    1e-4 of the largest logit: float32 noise that once read as a coupling."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    with torch.no_grad():
        net[0].bias.fill_(1e4)
        signs = torch.tensor([1.0, -1.0] * 8)
        for o in range(4):
            net[2].weight[o, :, 0, 0] = signs[torch.randperm(16, generator=torch.Generator().manual_seed(o))]
    return net.eval()


def test_permute_checks_in_float64_so_exact_permutations_are_kept():
    """Exact permutations were undone where float32 noise, amplified, passed 1e-4 of the largest logit
    (efficientnet_b0 after one epoch lost 10 groups); the weights come back in float32."""
    from wmbench.attacks.permute import permute_model

    net = _cancelling_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before = net(x).detach()
    result = permute_model(net, 1.0, torch.Generator().manual_seed(2), x)
    assert result[2] == 0  # no group undone
    assert all(p.dtype == torch.float32 for p in net.state_dict().values() if p.is_floating_point())
    assert torch.allclose(net(x), before, rtol=1e-2, atol=1e-2 * float(before.abs().max()))


def test_float32_output_checks_run_without_tf32():
    """A model that cannot run in float64 is checked in float32; on a CUDA GPU cuDNN convolutions
    default to TF32 (about 1e-3 relative noise, ten times the attacks' 1e-4 tolerance), so the check
    turns TF32 off inside its block and restores the process's setting after."""
    from wmbench.output_check import OutputReference

    class Float32Only(nn.Module):
        """A plain float32 tensor attribute used in forward: float64 inputs fail on it."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.mix = torch.randn(4, 4, 1, 1)
            self.seen: list[tuple[str, str]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return F.conv2d(self.conv(x), self.mix).flatten(1)

    net = Float32Only().eval()
    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    reference = OutputReference(net, torch.randn(2, 3, 8, 8), 1e-4)
    assert not reference.precise
    assert reference.kept(net)
    assert net.seen[-2:] == [("ieee", "ieee")] * 2  # the reference and the check
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_permute_says_how_much_of_a_densenet_it_cannot_reach(synthetic32):
    """DenseNet's concatenations give torch-pruning no channel groups: the row says how many groups
    were left and what share of the weights stays in place, instead of a silent 99% effect."""
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8, num_classes=synthetic32.num_classes).eval()
    ctx = AttackContext(synthetic32, torch.Generator().manual_seed(0), torch.device("cpu"))
    ATTACKS.build("permute").apply(model, 1.0, ctx)
    note = ctx.notes.get("detect_note", "")
    assert "unit groups could not be permuted" in note and "of the Conv/Linear weights stay in place" in note, note


def test_permute_restores_every_tensor_and_runs_models_float64_cannot():
    """Non-persistent buffers come back in float32 (they were left in float64 and broke the model);
    a model with a plain float32 tensor attribute is permuted with its own precision's check."""
    from torch import nn

    from wmbench.attacks.permute import permute_model

    class Normalised(nn.Module):
        def __init__(self, plain: bool):
            super().__init__()
            if plain:
                self.mean = torch.full((1, 1, 1, 1), 0.5)  # not registered: .double() cannot reach it
            else:
                self.register_buffer("mean", torch.full((1, 1, 1, 1), 0.5), persistent=False)
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))

        def forward(self, x):
            return self.body(x - self.mean)

    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for plain in (False, True):
        torch.manual_seed(0)
        model = Normalised(plain).eval()
        before = model(x).detach()
        result = permute_model(model, 1.0, torch.Generator().manual_seed(1), x)
        assert result[0] > 0 and result[2] == 0
        assert model.mean.dtype == torch.float32 and all(t.dtype == torch.float32 for t in [*model.parameters(), *model.buffers()])
        assert torch.allclose(model(x), before, atol=1e-5)


def test_dummy_neurons_on_a_model_without_an_eligible_layer_does_not_apply(synthetic32):
    """Depthwise convolutions only: no unit can be added. It said "0 units added to 0 layers
    (shapes changed)" and still permuted; now the row says the attack does not apply."""
    from wmbench.errors import NotApplicable

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1, groups=3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(3, 10))
    with pytest.raises(NotApplicable, match="dummy_neurons: no layer of this model can take added units"):
        attacked(model, "dummy_neurons", {}, 0.5, synthetic32)


class ChannelNormalised(torch.nn.Module):
    """F.normalize over the channels after the first block: a unit added there joins the norm."""

    def __init__(self, second: bool = True) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.second = second
        if second:
            self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        h = torch.nn.functional.normalize(torch.relu(self.b1(self.c1(x))), dim=1)
        if self.second:
            h = torch.relu(self.b2(self.c2(h)))
        return self.head(h.mean((2, 3)))


def _channel_normalised(second: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ChannelNormalised(second).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("args", [{}, {"kinds": ["zero"]}, {"kinds": ["split"], "permute": False}])
def test_dummy_neurons_leaves_a_layer_whose_dummies_change_the_output(args, synthetic32):
    """The growth was never checked (only the permutation after it, against the grown model): behind
    F.normalize(h, dim=1) the logits moved by 2-4% of their largest with "16 units added to 2 layers".
    The first block is now left at its size, as permute leaves a group whose permutation changes the
    output, and the note says so; the second block still grows."""
    model = _channel_normalised(second=True)
    x = synthetic32.test_x
    with torch.no_grad():
        reference = model(x)
        out, ctx = attacked(model, "dummy_neurons", args, 0.5, synthetic32)
        logits = out(x)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert out.c1.weight.shape[0] == 8 and out.b1.running_var.shape[0] == 8 and out.c2.weight.shape[1] == 8
    assert out.c2.weight.shape[0] == 12 and out.head.weight.shape[1] == 12  # 0.5 x 8 units added
    assert ctx.effect == 4 / 16
    assert ctx.notes["detect_note"] == ("dummy_neurons: 4 units added to 1 layers (shapes changed); "
                                        "1 layers left at their size (their added units changed the output)")
    again, _ = attacked(model, "dummy_neurons", args, 0.5, synthetic32)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in out.state_dict().items())


def test_dummy_neurons_does_not_apply_where_every_layer_s_dummies_change_the_output(synthetic32):
    from wmbench.errors import NotApplicable

    with pytest.raises(NotApplicable, match="adding units to any of the 1 eligible layers changed the model's output"):
        attacked(_channel_normalised(second=False), "dummy_neurons", {}, 0.5, synthetic32)


def test_permute_moves_convnext_stages_with_their_layer_scale(synthetic32):
    """ConvNeXt scales each block's output by a bare parameter (layer_scale) on the stage's residual
    stream: torch-pruning puts it in the group, which is now permuted with it (the group was
    permuted without it, changed the output and was undone: "groups left unpermuted"); resync
    puts it back."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from wmbench.resync import resync

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=synthetic32.num_classes).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 or name.endswith("layer_scale"):  # constant at initialisation
                p.normal_(1.0 if name.endswith(("layer_scale", "weight")) else 0.0, 0.2)
        reference = model(synthetic32.test_x)
        out, ctx = attacked(model, "permute", {}, 1.0, synthetic32)
        torch.testing.assert_close(out(synthetic32.test_x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert "detect_note" not in ctx.notes
    scales = [name for name, _ in model.named_parameters() if name.endswith("layer_scale")]
    assert scales and all(not torch.equal(out.get_parameter(n), model.get_parameter(n)) for n in scales)
    restored = resync(out, model, synthetic32.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


class PositionMapped(torch.nn.Module):
    """A (1, C, H, W) position map, C = 16 and H = W = 8, added to the first convolution's output:
    a learned parameter (torch-pruning indexes a bare parameter along its last non-singleton
    dimension, W, too short for 16 channels) or a fixed buffer (no parameter for it to see)."""

    def __init__(self, classes: int, buffer: bool = False) -> None:
        super().__init__()
        self.conv, self.conv2 = torch.nn.Conv2d(3, 16, 3, 4, 1), torch.nn.Conv2d(16, 8, 3, 1, 1)
        pos = torch.randn(1, 16, 8, 8)
        if buffer:
            self.register_buffer("pos", pos)
        else:
            self.pos = torch.nn.Parameter(pos)
        self.head = torch.nn.Linear(8, classes)

    def forward(self, x):
        h = torch.relu(self.conv(x) + self.pos)
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


def test_permute_moves_a_position_map_along_its_channels_and_resync_puts_it_back(synthetic32):
    """The map's last dimension (8) cannot hold the group's 16 channels: the group was dropped
    ("1 unit groups could not be permuted"), and resync, which matched the convolutions before bare
    parameters joined the groups, left them permuted (and matched the next group on permuted
    inputs). The map is now indexed along the one dimension that holds them: its channels."""
    from wmbench.resync import resync

    torch.manual_seed(0)
    model = PositionMapped(synthetic32.num_classes).eval()
    x = synthetic32.test_x
    with torch.no_grad():
        reference = model(x)
        out, ctx = attacked(model, "permute", {}, 1.0, synthetic32)
        torch.testing.assert_close(out(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert "detect_note" not in ctx.notes
    perm = torch.cdist(out.conv.weight.flatten(1), model.conv.weight.flatten(1)).argmin(1)
    assert not torch.equal(perm, torch.arange(16)) and torch.equal(out.pos, model.pos[:, perm])
    restored = resync(out, model, synthetic32.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_dummy_neurons_leaves_a_layer_whose_growth_breaks_the_forward(synthetic32):
    """Units added to the first convolution no longer fit the fixed buffer added to its output: the
    check's forward raised (RuntimeError: sizes must match) and the attack crashed. That layer is
    now left at its size, as one whose dummies change the output; the second still grows."""
    torch.manual_seed(0)
    model = PositionMapped(synthetic32.num_classes, buffer=True).eval()
    x = synthetic32.test_x
    with torch.no_grad():
        reference = model(x)
        out, ctx = attacked(model, "dummy_neurons", {}, 0.5, synthetic32)
        torch.testing.assert_close(out(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert out.conv.weight.shape[0] == 16 and out.conv2.weight.shape[0] == 12
    assert "1 layers left at their size (their added units changed the output)" in ctx.notes["detect_note"]


def test_output_checks_build_no_autograd_graph():
    """Attacks run with gradients on (``apply_attack``); the output checks' forwards, the float64
    probe included (``runs_in_float64``: it kept a float64 graph of the whole forward), run without."""
    from wmbench.output_check import OutputReference

    class Recording(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.grad: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.grad.append(torch.is_grad_enabled())
            return self.fc(x)

    net = Recording()
    with torch.enable_grad():
        reference = OutputReference(net, torch.randn(2, 4), 1e-4)
        assert reference.precise and reference.kept(net)
    assert len(net.grad) == 3 and not any(net.grad), net.grad  # the probe, the reference, the check


@pytest.mark.parametrize("attack", ["permute", "dummy_neurons"])
def test_a_function_preserving_attack_on_a_model_whose_output_is_a_tuple_says_it_cannot_check(attack):
    """A tuple output left nothing to compare a rewrite against: the check failed with a TypeError
    (``tuple - tuple``); the attack now says it cannot be applied, and why."""
    from wmbench.errors import NotApplicable

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.body(x)
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    data = types.SimpleNamespace(train_x=torch.randn(4, 3, 10, 10))  # all the attack reads of the data
    ctx = AttackContext(data, torch.Generator().manual_seed(0), torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(NotApplicable, match=f"{attack}: the model's output is a tuple, not one floating tensor"):
        ATTACKS.build(attack).apply(TwoHeads().eval(), 0.5, ctx)
