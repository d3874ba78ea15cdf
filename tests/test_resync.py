"""Resynchronised detection: permuted, rescaled, sign-flipped and padded models are detected again,
unwatermarked ones are not."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import train_small

from wmbench.api import AttackContext, Key, Method
from wmbench.grid import expand
from wmbench.image_mark import sample_positions
from wmbench.metrics import bit_detection
from wmbench.models import weight_params
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS
from wmbench.resync import resync
from wmbench.scenario import parse_scenario
from wmbench.detection import detect

CPU = torch.device("cpu")
ATTACKS_UNDONE = {
    "permute": ("permute", {}, 1.0),
    "scale-negate": ("scale", {"negate": True}, 2.0),
    "permute+scale": ("chain", {"attacks": [{"name": "permute", "strength": 1.0}, {"name": "scale", "args": {"negate": True}}]}, 2.0),
    "dummy_neurons": ("dummy_neurons", {}, 0.5),
}


def attack(model, label, data, seed=0):
    name, args, strength = ATTACKS_UNDONE[label]
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU)
    return ATTACKS.build(name, args).apply(model, strength, ctx)


@pytest.fixture(scope="module")
def tartaglione_model(digits):
    return train_small(digits, "tartaglione", epochs=1)


@pytest.mark.parametrize("label", list(ATTACKS_UNDONE))
@pytest.mark.parametrize("method", ["watermas", "tartaglione"])
def test_resync_detects_after_function_preserving_attacks(method, label, request, digits):
    model, key = request.getfixturevalue(f"{method}_model")
    m = METHODS.build(method)
    attacked = attack(model, label, digits)
    stat, _, _, detected, note = detect(m, attacked, key, 1e-6)
    if label != "scale-negate":  # negation leaves half the carriers' signs: plain detection may still see it
        assert not detected, (stat, note)
    stat, pvalue, _, detected, note = detect(m, attacked, key, 1e-6, reference=model, example=digits.train_x[:2])
    assert detected and stat > 0.99, (stat, note)


def test_resync_creates_no_detection_on_unwatermarked_models(none_model, watermas_model, digits):
    """The null: an independently trained, unwatermarked suspect, matched onto an owner's model that
    holds the mark of each of 20 keys, never correlates with the mark."""
    suspect = attack(none_model[0], "permute", digits)
    method = METHODS.build("watermas")
    stats = []
    for seed in range(20):
        owner = copy.deepcopy(watermas_model[0])
        key = method.finalize_key(owner, method.keygen(owner, digits, torch.Generator().manual_seed(100 + seed)))
        assert detect(method, owner, key, 1e-6)[3]  # the key is live in the owner's model
        stat, pvalue, _, detected, _ = detect(method, suspect, key, 1e-6, reference=owner, example=digits.train_x[:2])
        assert not detected, (seed, stat, pvalue)
        stats.append(stat)
    stats_t = torch.tensor(stats)
    assert float(stats_t.abs().max()) < 0.15 and abs(float(stats_t.mean())) < 0.05, stats


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("label", ["permute+scale", "dummy_neurons"])
def test_resync_restores_the_reference_weights(arch, label):
    """On deep architectures (residual groups, depthwise convolutions, squeeze-excitation), resync
    puts every weight back where the owner's model has it."""
    data = DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 8, "n_test": 4}).load(None)
    torch.manual_seed(0)
    model = MODELS.build(arch).build(data).train()
    with torch.no_grad():
        model(data.train_x)  # BN statistics away from (0, 1)
    model.eval()
    attacked = attack(model, label, data)
    restored = resync(attacked, model, data.train_x[:2])
    reference = model.state_dict()
    for name, value in restored.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("label", ["scale-negate", "permute+scale"])
def test_resync_undoes_the_scale_of_grouped_convolutions(label):
    """Grouped (not depthwise) convolutions, as in RegNet and ResNeXt, belong to no unit group, yet
    the scale attack rescales them with their BatchNorm: resync restores them row by row (it left
    them scaled and sign-flipped: WaterMAS r = 0.36 after scale-negate on regnet_x_400mf)."""
    data = DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 8, "n_test": 4}).load(None)
    torch.manual_seed(0)
    model = MODELS.build("torchvision", {"arch": "regnet_x_400mf"}).build(data).train()
    with torch.no_grad():
        model(data.train_x)
    model.eval()
    attacked = attack(model, label, data)
    grouped = [n for n, m in attacked.named_modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.out_channels]
    assert grouped and not torch.allclose(attacked.get_submodule(grouped[0]).weight, model.get_submodule(grouped[0]).weight)
    restored = resync(attacked, model, data.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resync_is_an_entry_option_sharing_the_training():
    doc = {
        "name": "t", "datasets": ["digits"], "models": ["small_cnn"],
        "methods": ["watermas", {"name": "watermas", "label": "watermas+resync", "resync": True}],
        "attacks": [{"name": "permute", "strengths": [1.0]}],
    }
    scenario = parse_scenario(doc, None)
    assert [m.resync for m in scenario.methods] == [False, True]
    plain, synced = expand(scenario)
    assert plain.train_id == synced.train_id
    assert {a.cell_id for a in plain.attacks}.isdisjoint(a.cell_id for a in synced.attacks)
    doc["methods"][1]["resync"] = "yes"
    with pytest.raises(Exception, match=r"methods\[1\].resync"):
        parse_scenario(doc, None)


@dataclass(frozen=True)
class SignBits(Method):
    """A plug-in written without resync in mind: bits in the signs of random Conv/Linear weights."""

    name: ClassVar[str] = "sign_bits"
    n: int = 256

    def keygen(self, model, data, rng):
        params = weight_params(model)
        names = list(params)
        pid, idx = sample_positions([p.numel() for p in params.values()], self.n, rng)  # distinct weights
        bits = torch.randint(2, (self.n,), generator=rng)
        with torch.no_grad():
            for i, j, b in zip(pid.tolist(), idx.tolist(), bits.tolist()):
                w = params[names[i]].view(-1)
                w[j] = w[j].abs() * (1 if b else -1)
        return Key(self.name, {"pid": pid, "idx": idx, "bits": bits}, {"names": names})

    def extract(self, model, key):
        params = weight_params(model)
        return torch.stack([params[key.meta["names"][i]].detach().reshape(-1)[j] > 0 for i, j in zip(key.tensors["pid"].tolist(), key.tensors["idx"].tolist())])

    def detect(self, model, key):
        return bit_detection(self.extract(model, key), key.tensors["bits"])

    def carriers(self, key):
        return {name: key.tensors["idx"][key.tensors["pid"] == i] for i, name in enumerate(key.meta["names"])}


def test_resync_serves_a_plugin_method_unchanged(digits):
    torch.manual_seed(0)
    model = MODELS.build("small_cnn").build(digits).eval()
    method = SignBits()
    key = method.keygen(model, digits, torch.Generator().manual_seed(0))
    attacked = attack(model, "permute+scale", digits)
    assert not detect(method, attacked, key, 1e-6)[3]
    stat, _, _, detected, _ = detect(method, attacked, key, 1e-6, reference=model, example=digits.train_x[:2])
    assert detected and stat == 1.0


@dataclass(frozen=True)
class CarriersRaise(SignBits):
    """SignBits whose carriers() raises ``error`` (a plug-in's bug, or its way to say it has none)."""

    name: ClassVar[str] = "sign_bits_carriers_raise"
    error: str = "value"

    def carriers(self, key):
        import errno

        raise {"value": ValueError("no carriers today"), "none": NotImplementedError(),
               "disk": OSError(errno.EIO, "Input/output error")}[self.error]


def test_a_plugins_carriers_that_raise_warn_once_and_resync_goes_on_without_exclusion(digits, caplog):
    """carriers() is optional for a plug-in: NotImplementedError means none, silently. Any other
    exception was swallowed as silently: now logged once per method as a warning naming the method
    and the exception, and detection (resynchronised, with no carrier left out of the matching)
    goes on; a machine fault (an I/O error) is raised, as everywhere else."""
    import logging

    for error in ("value", "none"):
        torch.manual_seed(0)
        model = MODELS.build("small_cnn").build(digits).eval()
        method = CarriersRaise(error=error)
        key = method.keygen(model, digits, torch.Generator().manual_seed(0))
        attacked = attack(model, "permute+scale", digits)
        with caplog.at_level(logging.WARNING, logger="wmbench.detection"):
            caplog.clear()
            for _ in range(2):
                stat, _, _, detected, note = detect(method, attacked, key, 1e-6, reference=model, example=digits.train_x[:2])
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if error == "none":
            assert warnings == [], warnings
        else:
            assert len(warnings) == 1 and "sign_bits_carriers_raise" in warnings[0] and "ValueError: no carriers today" in warnings[0], warnings
        assert detected and stat == 1.0 and note is None, (stat, note)  # resync ran, with nothing left out, and undid the attack
    with pytest.raises(OSError):
        detect(CarriersRaise(error="disk"), attacked, key, 1e-6, reference=model, example=digits.train_x[:2])


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """torchvision's ViT, small; the tensors torchvision starts constant (the head: every output 0;
    the class token, LayerNorms) drawn at random, as training leaves them, so that moving them shows."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=4)
    torch.nn.init.normal_(model.heads.head.weight)
    torch.nn.init.normal_(model.class_token, std=0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    return model.eval()


def synthetic32():
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 8, "n_test": 4}).load(None)


def test_permute_moves_a_vit_residual_stream_and_resync_puts_it_back():
    """The hidden dimension every block reads and writes (patch embedding, class token, position
    embedding, LayerNorms, attention input columns and out_proj rows, MLP columns and rows, the
    head's columns) is one group: one permutation moves all of it, the logits stay, the effect
    counts its units and resync restores it (it was left in place, "1 unit groups could not be
    permuted")."""
    from wmbench.attacks.permute import permute_model

    data = synthetic32()
    model = tiny_vit()
    attacked = copy.deepcopy(model)
    result = permute_model(attacked, 1.0, torch.Generator().manual_seed(0), data.train_x[:4])
    assert result.skipped == 0 and result.undone == 0
    assert result.total == 2 * 64 + 2 * (2 * 32) + 32  # two MLP groups, two attention layers, the residual stream
    torch.testing.assert_close(attacked(data.test_x), model(data.test_x), rtol=1e-4, atol=1e-4)
    rows = attacked.conv_proj.weight.flatten(1)
    perm = torch.cdist(rows, model.conv_proj.weight.flatten(1)).argmin(1)
    assert not torch.equal(perm, torch.arange(32)) and torch.equal(rows, model.conv_proj.weight.flatten(1)[perm])
    assert torch.equal(attacked.class_token, model.class_token[..., perm])
    assert torch.equal(attacked.encoder.pos_embedding, model.encoder.pos_embedding[..., perm])
    assert torch.equal(attacked.encoder.ln.weight, model.encoder.ln.weight[perm])
    assert torch.equal(attacked.heads.head.weight, model.heads.head.weight[:, perm])
    restored = resync(attacked, model, data.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resync_recovers_a_mark_in_vit_blocks_after_the_residual_stream_moved():
    """WaterMAS carriers in the blocks' Linear weights, whose columns or rows lie on the residual
    stream: plain detection loses them after permute, resync finds them again (r = 1.00)."""
    data = synthetic32()
    model = tiny_vit()
    method = METHODS.build("watermas")
    key = method.finalize_key(model, method.keygen(model, data, torch.Generator().manual_seed(0)))
    assert any(".mlp." in name for name in method.carriers(key)), "no carrier in an MLP layer"
    attacked = attack(model, "permute", data)
    assert not torch.equal(attacked.class_token, model.class_token)  # the residual stream moved
    plain = detect(method, attacked, key, 1e-6)
    synced = detect(method, attacked, key, 1e-6, reference=model, example=data.train_x[:2])
    assert not plain[3] and synced[3] and synced[0] > 0.99, (plain, synced)


@pytest.mark.parametrize("label", ["permute", "scale-negate", "permute+scale"])
def test_attention_heads_move_and_resync_puts_them_back(label):
    """The permute and scale attacks reach inside nn.MultiheadAttention (heads reordered, query/key
    and value dimensions permuted, rescaled and sign-flipped: they left every attention weight
    where it was), the ViT computes the same function, and resync restores every weight."""
    data = synthetic32()
    model = tiny_vit()
    attacked = attack(model, label, data)
    torch.testing.assert_close(attacked(data.test_x), model(data.test_x), rtol=1e-4, atol=1e-4)
    for layer, original in zip(attacked.encoder.layers, model.encoder.layers):
        assert not torch.allclose(layer.self_attention.in_proj_weight, original.self_attention.in_proj_weight)
    restored = resync(attacked, model, data.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_resync_recovers_a_mark_held_in_attention_weights():
    """WaterMAS carriers drawn in the attention projections: lost to plain detection after the
    heads are permuted and sign-flipped, found again (r = 1.00) after resync."""
    data = synthetic32()
    model = tiny_vit()
    method = METHODS.build("watermas")
    key = method.finalize_key(model, method.keygen(model, data, torch.Generator().manual_seed(0)))
    in_attention = [name for name in method.carriers(key) if "self_attention" in name]
    assert in_attention, "no carrier in an attention layer"
    attacked = attack(model, "permute+scale", data)
    plain = detect(method, attacked, key, 1e-6)
    synced = detect(method, attacked, key, 1e-6, reference=model, example=data.train_x[:2])
    assert not plain[3] and synced[3] and synced[0] > 0.99, (plain, synced)


def test_attention_resync_creates_no_detection_on_an_unwatermarked_vit():
    """The null in attention weights and on the residual stream: an independently initialised ViT,
    permuted (heads and residual stream), matched onto an owner's ViT that holds each of 10 keys'
    marks, never correlates with the mark (carriers are left out of the matching)."""
    data = synthetic32()
    owner = tiny_vit()
    independent = tiny_vit(seed=1)
    suspect = attack(independent, "permute", data)
    assert not torch.equal(suspect.conv_proj.weight, independent.conv_proj.weight)  # the residual stream moved
    method = METHODS.build("watermas")
    for seed in range(10):
        key = method.finalize_key(owner, method.keygen(owner, data, torch.Generator().manual_seed(100 + seed)))
        stat, pvalue, _, detected, _ = detect(method, suspect, key, 1e-6, reference=owner, example=data.train_x[:2])
        assert not detected and abs(stat) < 0.3, (seed, stat, pvalue)


@pytest.mark.parametrize("packed", [True, False])
def test_attention_matching_never_reads_the_carriers(packed):
    """Two suspects that differ only at the key's carriers (in the q/k/v projections and in
    out_proj, where the mask was missing) are matched alike: the carriers' values cannot steer the
    alignment (an unmasked out_proj widened the null's spread by half)."""
    from wmbench.attention import match

    torch.manual_seed(0)
    kdim = None if packed else 24
    reference = torch.nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim)
    names = ["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    params = dict(reference.named_parameters())
    carriers = {n: torch.randperm(params[n].numel())[: params[n].numel() * 2 // 5] for n in [*names, "out_proj.weight"]}
    maps = []
    for seed in (1, 2):
        suspect = copy.deepcopy(reference)
        suspect_params = dict(suspect.named_parameters())
        with torch.no_grad():
            for n, idx in carriers.items():
                suspect_params[n].view(-1)[idx] = torch.randn(len(idx), generator=torch.Generator().manual_seed(seed)) * 100
        maps.append(match(reference, suspect, carriers))
    for field in ("heads", "qk", "v"):
        assert torch.equal(getattr(maps[0], field), getattr(maps[1], field)), field


def test_a_machine_fault_during_resync_is_raised_and_a_models_problem_falls_back(watermas_model, digits, monkeypatch):
    """A model resync cannot analyse is detected plainly and says so; a full disk is not the model's
    problem and stops the run (it fell back to plain detection too)."""
    import errno

    import wmbench.resync

    model, key = watermas_model
    method = METHODS.build("watermas")
    monkeypatch.setattr(wmbench.resync, "resync", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("odd graph")))
    assert "resync failed" in detect(method, model, key, 1e-6, reference=model, example=digits.train_x[:2])[4]
    monkeypatch.setattr(wmbench.resync, "resync", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        detect(method, model, key, 1e-6, reference=model, example=digits.train_x[:2])


def _narrow_cnn() -> torch.nn.Module:
    """A 3x3 stem and two 1x1 blocks of 8 channels: rows of 8 inputs, as in MNASNet's or
    MobileNet's narrow pointwise convolutions, where half the inputs pruned leaves 4."""
    nn = torch.nn
    blocks = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    for _ in range(2):
        blocks += [nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("then_permute", [False, True])
def test_resync_is_not_misled_by_inputs_that_structured_pruning_zeroed(then_permute):
    """Structured pruning zeroes a layer's output channels and the next layer's input columns. Those
    columns, zero in every suspect row, say nothing about which unit is which; matched with the
    reference's values there, each unit's cosine with its own copy fell to ~0.7 and, on rows of few
    inputs, chance similarities won: on mnasnet0_5, resync moved units of a model that was only
    pruned and WaterMAS's r fell from 0.50 (detected) to -0.02. Resync leaves a pruned model as it
    is, and puts a pruned-then-permuted one back."""
    data = DATASETS.build("synthetic", {"channels": 3, "size": 8, "n_train": 8, "n_test": 4}).load(None)
    prune = {"name": "prune", "args": {"mode": "structured"}}
    moved = []
    for seed in range(12):
        torch.manual_seed(seed)
        model = _narrow_cnn()
        ctx = lambda: AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU)  # noqa: E731
        pruned = ATTACKS.build("prune", prune["args"]).apply(model, 0.5, ctx())
        attacked = ATTACKS.build("chain", {"attacks": [prune, "permute"]}).apply(model, 0.5, ctx()) if then_permute else pruned
        restored = resync(attacked, model, data.train_x[:2]).state_dict()
        moved += [(seed, name) for name, value in pruned.state_dict().items() if value.is_floating_point() and not torch.allclose(restored[name], value, atol=1e-6)]
    assert not moved


@pytest.mark.parametrize("arch", ["small_cnn", "tiny_vit"])
@pytest.mark.parametrize("negate", [False, True])
def test_resync_undoes_scale_at_its_largest_strength(arch, negate):
    """``scale`` takes strengths up to 30: factors down to e^-30 ~ 9e-14 (ReLU-rule rows, attention
    dimensions). Resync undid only factors above 1e-6, so from strength ~14 on it left rows rescaled
    by up to 1e13 and read the mark worse than plain detection (small_cnn, WaterMAS: r 0.05 against
    0.21 at 30). Every weight comes back, as at strength 1."""
    data = synthetic32()
    torch.manual_seed(0)
    model = tiny_vit() if arch == "tiny_vit" else MODELS.build(arch).build(data)
    model.train()
    with torch.no_grad():
        model(data.train_x)  # BN statistics away from (0, 1)
    model.eval()
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=CPU)
    attacked = ATTACKS.build("scale", {"negate": negate}).apply(model, 30.0, ctx)
    torch.testing.assert_close(attacked(data.test_x), model(data.test_x), rtol=1e-4, atol=1e-4)
    restored = resync(attacked, model, data.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _chain(model, data, attacks, strength, seed):
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU)
    return ATTACKS.build("chain", {"attacks": attacks}).apply(model, strength, ctx)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resync_leaves_a_never_permuted_model_whose_rows_noise_drowned_in_place(watermas_model, tartaglione_model, digits, seed):
    """Noise as large as the weights leaves rows of 9 inputs (the first convolution) whose chance
    similarities beat a unit's own: the assignment moved units of a model that was never permuted,
    and resync read less than plain detection (WaterMAS r 0.19 against 0.32 at seed 0; Tartaglione
    -0.01 / 0.14 / 0.68 against 0.96). The group's consumers fit significantly worse with those
    moves than with the units in place, so the units stay: WaterMAS's model comes back unchanged and
    reads as plainly; Tartaglione reads 0.96 at seeds 1 and 2 and 0.81 at seed 0, where the first
    layer's consumers, with the carriers left out, are at chance too and cannot say (t ~ 0)."""
    for (model, key), floor in ((watermas_model, None), (tartaglione_model, 0.8)):
        method = METHODS.build(key.method)
        attacked = _chain(model, digits, ["noise"], 1.0, seed)
        plain = detect(method, attacked, key, 1e-6)
        synced = detect(method, attacked, key, 1e-6, reference=model, example=digits.train_x[:2])
        if floor is None:
            restored = resync(attacked, model, digits.train_x[:2], method.carriers(key)).state_dict()
            for name, value in attacked.state_dict().items():
                assert torch.equal(restored[name], value), name
            assert synced[:4] == plain[:4], (plain, synced)
        else:
            assert plain[3] and synced[3] and synced[0] > floor, (plain, synced)


@pytest.mark.parametrize("order", ["permute-then-noise", "noise-then-permute"])
def test_resync_still_puts_back_a_permuted_noisy_model(watermas_model, tartaglione_model, digits, order):
    """The consumers' check keeps a real permutation: with noise at 0.5 before or after the
    permutation (every moved unit's match below SCALE_COS, so the check runs), resync reads the
    mark (WaterMAS r 0.57-0.63, Tartaglione 0.96-0.99, as before the check)."""
    attacks = ["permute", "noise"] if order == "permute-then-noise" else ["noise", "permute"]
    for (model, key), floor in ((watermas_model, 0.5), (tartaglione_model, 0.95)):
        method = METHODS.build(key.method)
        for seed in range(3):
            attacked = _chain(model, digits, attacks, 0.5, seed)
            stat, _, _, detected, note = detect(method, attacked, key, 1e-6, reference=model, example=digits.train_x[:2])
            assert detected and stat > floor, (key.method, seed, stat, note)


def _untraceable_shufflenet(arch: str, seed: int = 0):  # type: ignore[no-untyped-def]
    """A ShuffleNetV2 that torch-pruning cannot trace (a stage of 3 units or more: its reshape index
    mapping divides by zero after the channel shuffle), with BatchNorm statistics away from (0, 1),
    and its data: shufflenet_v2_x0_5 on digits, or a narrow one with stages of 3, 1, 1 units on 32x32."""
    from torchvision.models import ShuffleNetV2

    if arch == "shufflenet_v2_x0_5":
        data = DATASETS.build("digits").load(None)
        torch.manual_seed(seed)
        model = MODELS.build("torchvision", {"arch": arch}).build(data)
    else:
        data = synthetic32()
        torch.manual_seed(seed)
        model = ShuffleNetV2([3, 1, 1], [8, 16, 32, 64, 128], num_classes=data.num_classes)
    model.train()
    with torch.no_grad():
        model(data.train_x[:64])
    return model.eval(), data


@pytest.mark.parametrize("arch", ["small", "shufflenet_v2_x0_5"])
def test_resync_undoes_scale_on_a_model_torch_pruning_cannot_trace(arch):
    """ShuffleNetV2's channel shuffle defeats torch-pruning's dependency graph, so no unit group can be
    matched, and resync failed as a whole ('resync failed', plain detection: a sign mark read at
    chance after scale-negate). The scale attack traces it with torch.fx and never moves units:
    resync undoes each BatchNorm-coupled layer's row factors in place, every weight comes back and
    the mark reads as on the unattacked model; the row says the units were not matched."""
    from wmbench.errors import NotApplicable
    from wmbench.units import unit_groups

    model, data = _untraceable_shufflenet(arch)
    with pytest.raises(NotApplicable, match="torch-pruning cannot trace ShuffleNetV2"):
        unit_groups(model, data.train_x[:2])
    method = SignBits()
    key = method.keygen(model, data, torch.Generator().manual_seed(0))
    clean_stat = detect(method, model, key, 1e-6)[0]
    attacked = attack(model, "scale-negate", data)
    stat, _, _, detected, _ = detect(method, attacked, key, 1e-6)
    assert not detected and stat < 0.75, stat
    restored = resync(attacked, model, data.train_x[:2]).state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-5, msg=name)
    stat, _, _, detected, note = detect(method, attacked, key, 1e-6, reference=model, example=data.train_x[:2])
    assert detected and stat == clean_stat == 1.0, (stat, note)
    assert note.startswith("resync partial (torch-pruning cannot trace ShuffleNetV2") and "resync failed" not in note, note
    assert "units not matched" in note, note


def test_resync_on_an_untraceable_model_creates_no_detection():
    """The null where units cannot be matched: an unwatermarked suspect, scale-negated, read with 20
    keys whose marks the owner's model holds. Independently trained, it stays at chance; the owner's
    own model before the mark was written (every row a multiple of the owner's outside the
    carriers) is restored to exactly that unmarked model, and reads as it does: the factors are
    estimated with the carriers left out, so they never pull the mark in."""
    method = SignBits()
    base, data = _untraceable_shufflenet("small", seed=0)
    independent = attack(_untraceable_shufflenet("small", seed=1)[0], "scale-negate", data)
    twin = attack(base, "scale-negate", data)
    stats = {"independent": [], "twin": []}
    for seed in range(20):
        owner = copy.deepcopy(base)
        key = method.keygen(owner, data, torch.Generator().manual_seed(100 + seed))
        assert detect(method, owner, key, 1e-6)[3]  # the key is live in the owner's model
        for label, suspect in (("independent", independent), ("twin", twin)):
            stat, pvalue, _, detected, note = detect(method, suspect, key, 1e-6, reference=owner, example=data.train_x[:2])
            assert not detected and "resync partial" in note, (label, seed, stat, pvalue, note)
            stats[label].append(stat)
        assert stats["twin"][-1] == detect(method, base, key, 1e-6)[0]  # the unmarked model's own reading
    for label, values in stats.items():
        values_t = torch.tensor(values)
        assert float((values_t - 0.5).abs().max()) < 0.12 and abs(float(values_t.mean()) - 0.5) < 0.03, (label, values)


def _untraceable(*args, **kwargs):  # type: ignore[no-untyped-def]
    from wmbench.errors import NotApplicable

    raise NotApplicable("torch-pruning cannot trace Sequential (test)")


def test_resync_undoes_relu_coupled_scale_on_a_model_torch_pruning_cannot_trace(digits, monkeypatch):
    """Where no unit group can be matched, resync undid only BatchNorm-coupled factors: the scale
    attack's ReLU rule (a layer's rows times a, the next layer's columns, after a pooling or a
    flatten too, times 1/a) stayed on every layer without a BatchNorm, and resync failed as a whole
    where there was no BatchNorm. Each ReLU-coupled producer's rows are now divided by their factor
    against the owner's rows and its consumer's columns multiplied by it, in graph order (a layer's
    columns are back before its own rows are compared): every weight comes back."""
    import wmbench.resync

    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 10)).eval()
    model[4].running_var.uniform_(0.5, 2.0)
    ctx = AttackContext(data=digits, rng=torch.Generator().manual_seed(0), device=CPU)
    attacked = ATTACKS.build("scale", {"negate": True}).apply(model, 2.0, ctx)
    torch.testing.assert_close(attacked(digits.test_x[:8]), model(digits.test_x[:8]), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(wmbench.resync, "unit_groups", _untraceable)
    notes: list[str] = []
    restored = resync(attacked, model, digits.train_x[:2], notes=notes).state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(restored[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert notes == ["resync partial (torch-pruning cannot trace Sequential (test)): units not matched, only the rescaling of "
                     "1 BatchNorm-coupled layers and 2 ReLU-coupled layers undone"], notes


def test_resync_fails_only_where_nothing_can_be_undone(digits, monkeypatch):
    """A model whose units cannot be matched and that has no BatchNorm- or ReLU-coupled layer (nor
    attention layer) leaves resync nothing to undo: the row still says 'resync failed', plain
    detection (Tanh is not positively homogeneous: the scale attack couples nothing through it)."""
    import wmbench.resync
    from wmbench.errors import NotApplicable

    untraceable = _untraceable
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Tanh(), nn.Conv2d(8, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    method = SignBits()
    key = method.keygen(model, digits, torch.Generator().manual_seed(0))
    monkeypatch.setattr(wmbench.resync, "unit_groups", untraceable)
    with pytest.raises(NotApplicable, match="cannot trace Sequential"):
        resync(model, model, digits.train_x[:2])
    note = detect(method, model, key, 1e-6, reference=model, example=digits.train_x[:2])[4]
    assert note.startswith("resync failed (NotApplicable: torch-pruning cannot trace Sequential"), note


def test_the_consumers_check_reads_cosines_of_tiny_rows_as_the_matching_does():
    """The matching and the consumers' check share one masked cosine (``_cosines``). The check
    floored the product of the two rows' norms at 1e-30, the matching each norm on its own: a
    reference row of norm ~5e-21 read a cosine of ~4e-4 with its own copy at ~5e-13 in the check
    (1.0 in the matching). A cosine does not depend on the rows' scales now, down to norms of
    1e-30 (reference) and 1e-15 (suspect), as in the matching."""
    from wmbench.resync import _consumer_fit
    from wmbench.units import unit_groups

    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4)).eval()
    example = torch.randn(2, 3, 8, 8)

    def first_group(m):  # type: ignore[no-untyped-def]
        return next(g for g in unit_groups(m, example)[0] if g.producers[0].name == "0")

    fits = []
    for ref_factor, sus_factor in ((1.0, 1.0), (1e-20, 1e-12)):
        ref, sus = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            ref[2].weight.mul_(ref_factor)
            sus[2].weight.mul_(sus_factor)
        group, members = first_group(ref), {(m.name, m.kind): m for m in first_group(sus).members}
        fits.append(_consumer_fit(group, members, torch.arange(group.units), [], {}, {}, {}))
    torch.testing.assert_close(fits[1], fits[0], rtol=1e-6, atol=0.0)
    assert bool((fits[0] > 0.999).all())


class _ReadsALayersWeight(torch.nn.Module):
    """conv0's block, which torch-pruning sees whole, then conv's, whose output goes through
    ``F.linear(h, self.mix.weight, self.mix.bias)`` (mix never called): torch-pruning reads that
    product as element-wise and couples conv's channel i with the classifier's input i."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mix, self.fc = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):  # type: ignore[no-untyped-def]
        F = torch.nn.functional
        h = F.relu(self.bn0(self.conv0(x)))
        h = F.relu(self.bn(self.conv(h))).mean((2, 3))
        return self.fc(F.linear(h, self.mix.weight, self.mix.bias))


@torch.no_grad()
def _permute_channels(model, layer: str, bn: str, consumer: str, perm) -> None:  # type: ignore[no-untyped-def]
    """A function-preserving permutation of ``layer``'s output channels: its rows, its BatchNorm's
    entries and ``consumer``'s input columns."""
    for name in ("weight", "bias"):
        getattr(model.get_submodule(layer), name).copy_(getattr(model.get_submodule(layer), name)[perm])
    norm = model.get_submodule(bn)
    for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
        t.copy_(t[perm])
    w = model.get_submodule(consumer).weight
    w.copy_(w[:, perm])


def test_resync_leaves_in_place_a_group_whose_matching_would_change_the_outputs():
    """A thief permutes conv's channels with mix's columns (the function kept; ``permute`` cannot,
    its output check undoes that group) and conv0's. torch-pruning couples conv's channels to the
    classifier's inputs instead of mix's columns, so resync put conv's rows back and shuffled the
    classifier's columns, silently: the suspect computed another function and a mark in the
    classifier read at chance. Resync's outputs are checked against the suspect's now: where they
    changed, each group is checked as it is matched and one that changes them is left in place,
    with a 'resync partial' note; conv0's group is put back as before."""
    data = synthetic32()
    torch.manual_seed(0)
    model = _ReadsALayersWeight()
    model.train()
    with torch.no_grad():
        model(data.train_x[:64])
    model.eval()
    suspect = copy.deepcopy(model)
    _permute_channels(suspect, "conv0", "bn0", "conv", torch.randperm(8))
    _permute_channels(suspect, "conv", "bn", "mix", torch.randperm(8))
    x = data.test_x[:8]
    torch.testing.assert_close(suspect(x), model(x), rtol=1e-5, atol=1e-5)
    notes: list[str] = []
    restored = resync(suspect, model, data.train_x[:2], notes=notes)
    torch.testing.assert_close(restored(x), suspect(x), rtol=1e-4, atol=1e-5)
    for name in ("conv0.weight", "bn0.running_mean", "fc.weight"):
        torch.testing.assert_close(restored.state_dict()[name], model.state_dict()[name], msg=name)
    torch.testing.assert_close(restored.conv.weight.sum((0, 2, 3)), model.conv.weight.sum((0, 2, 3)))  # conv0's order on its inputs
    assert notes == ["resync partial: 1 of 2 unit groups left unmatched (matching them changed the suspect's outputs: a coupling the "
                     "dependency graph does not see, e.g. a layer used outside its forward): conv"], notes


class _TwoOutputs(torch.nn.Module):
    """An MLP whose forward returns (logits, hidden features): not one floating tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = torch.relu(self.a(x))
        return self.b(h), h


def test_resync_puts_back_a_model_whose_output_is_not_one_tensor():
    """Resync's output check compares one floating tensor (``OutputReference.of_floating``); a model
    returning a tuple has nothing to compare, so it is not checked, and its units are still put back."""
    torch.manual_seed(0)
    model = _TwoOutputs().eval()
    suspect, perm = copy.deepcopy(model), torch.randperm(8)
    with torch.no_grad():
        suspect.a.weight.copy_(suspect.a.weight[perm])
        suspect.a.bias.copy_(suspect.a.bias[perm])
        suspect.b.weight.copy_(suspect.b.weight[:, perm])
    notes: list[str] = []
    restored = resync(suspect, model, torch.randn(4, 6), notes=notes)
    assert notes == []
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
