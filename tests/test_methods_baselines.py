"""The baselines (Uchida, Tartaglione, Li) keep their promises on small_cnn / digits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from wmbench.api import Key
from wmbench.data import DataBundle
from wmbench.errors import NotApplicable
from wmbench.image_mark import CarrierSet
from wmbench.metrics import accuracy
from wmbench.registry import METHODS, MODELS

from conftest import CPU, train_small

ROUND_TRIP = {"uchida": {}, "tartaglione": {}, "li_sign": {"finetune_epochs": 2}}
EPOCHS = {"uchida": 4, "tartaglione": 2, "li_sign": 3}


@pytest.fixture(scope="module")
def trained(digits):
    return {name: train_small(digits, name, epochs=EPOCHS[name], **args) for name, args in ROUND_TRIP.items()}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_detected_without_attack(trained, name):
    model, key = trained[name]
    assert METHODS.build(name, ROUND_TRIP[name]).detect(model, key).pvalue < 1e-6


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_not_detected_on_unwatermarked_model_with_the_same_key(trained, none_model, name):
    _, key = trained[name]
    assert METHODS.build(name, ROUND_TRIP[name]).detect(none_model[0], key).pvalue > 1e-3


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_accuracy_is_kept(trained, digits, name):
    assert accuracy(trained[name][0], digits, CPU) > 0.85


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_key_round_trips(trained, name, tmp_path):
    model, key = trained[name]
    key.save(tmp_path / "key.safetensors")
    loaded = Key.load(tmp_path / "key.safetensors")
    method = METHODS.build(name, ROUND_TRIP[name])
    assert loaded.meta == key.meta and method.detect(model, loaded) == method.detect(model, key)


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_detection_refuses_a_reshaped_model(trained, name):
    model, key = trained[name]
    other = copy.deepcopy(model)
    other[3] = nn.Conv2d(16, 8, 3, padding=1, bias=False)  # small_cnn's second conv, fewer channels
    name_hit = any(n.startswith("3.") for n in METHODS.build(name).carriers(key))
    if name_hit:
        with pytest.raises(NotApplicable):
            METHODS.build(name).detect(other, key)


# --- Uchida -------------------------------------------------------------------------------------


def test_uchida_default_layer_is_a_middle_conv():
    from wmbench.methods.uchida import default_layer

    data = DataBundle("t", torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), 10)
    assert default_layer(MODELS.build("small_cnn").build(data)) == "3"
    assert default_layer(MODELS.build("resnet18").build(data)) == "layer3.0.conv1"


def test_uchida_bits_are_the_signs_of_the_projection(trained):
    model, key = trained["uchida"]
    w_bar = model[3].weight.detach().mean(0).flatten()
    projected = torch.sigmoid(key.tensors["x"] @ w_bar)
    decoded = METHODS.build("uchida").extract(model, key)
    assert torch.equal(decoded, (projected > 0.5).float())
    assert key.tensors["x"].shape == (144, 144)  # T capped at len(w_bar) = 16 * 3 * 3
    result = METHODS.build("uchida").detect(model, key)
    assert result.stat == pytest.approx(float((decoded == key.tensors["bits"].float()).float().mean()))


def test_uchida_remove_flips_half_the_bits_at_no_cost(trained, digits):
    model, key = trained["uchida"]
    method = METHODS.build("uchida")
    attacked = copy.deepcopy(model)
    before = method.extract(model, key)
    assert method.remove(attacked, key, model[3].weight.numel(), torch.Generator().manual_seed(0))
    after = method.extract(attacked, key)
    assert int((before != after).sum()) == len(before) // 2
    assert method.detect(attacked, key).pvalue > 1e-3
    assert accuracy(attacked, digits, CPU) > accuracy(model, digits, CPU) - 0.05
    untouched = copy.deepcopy(model)
    assert method.remove(untouched, key, 0, torch.Generator().manual_seed(0))
    assert torch.equal(untouched[3].weight, model[3].weight)


def test_uchida_remove_moves_only_its_budget_and_flips_bits_on_resnet18():
    """1024 weights of a ResNet18 layer of 294912 (once 0 flips: k = round(0.44)): exactly 1024
    weights move and half the bits flip; 16 weights still flip some."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    method = METHODS.build("uchida")
    key = method.keygen(model, None, torch.Generator().manual_seed(0))
    key.tensors["bits"] = method.extract(model, key).to(torch.uint8)  # as if embedded: accuracy 1
    before = dict(model.named_parameters())[key.meta["param"]].detach().clone()
    flips = {}
    for count in (16, 1024):
        attacked = copy.deepcopy(model)
        assert method.remove(attacked, key, count, torch.Generator().manual_seed(1))
        after = dict(attacked.named_parameters())[key.meta["param"]].detach()
        assert int((after != before).sum()) == count
        flips[count] = int((method.extract(attacked, key) != key.tensors["bits"].float()).sum())
    assert flips[1024] == key.meta["bits"] // 2 and 0 < flips[16] < flips[1024]


# --- Tartaglione --------------------------------------------------------------------------------


def test_tartaglione_carriers_are_bit_identical_after_training(trained):
    model, key = trained["tartaglione"]
    values = CarrierSet.bind(model, key).read(len(key.tensors["flat_idx"]))
    assert torch.equal(values, key.tensors["values"])
    assert METHODS.build("tartaglione").detect(model, key).stat == pytest.approx(1.0, abs=1e-9)
    names = set(METHODS.build("tartaglione").carriers(key))
    assert any(not n.endswith("weight") or n.startswith("1.") for n in names)  # scope: every parameter


def reference_replica_update(model, key, batch, replicas, std, lam, replica_lr, lr):
    """The EIDOSLAB loop with real replica models (deep copies), for one batch."""
    x, y = batch
    loss_fn = nn.CrossEntropyLoss()
    carriers = CarrierSet.bind(model, key)
    generator = torch.Generator().manual_seed(int(key.meta["noise_seed"]))
    sizes = [len(idx) for idx in carriers.indices]
    noise = [torch.randn(sum(sizes), generator=generator, dtype=torch.float64).split(sizes) for _ in range(replicas)]
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in carriers.params]
    where = dict(zip(order, carriers.indices))
    reps = []
    for r in range(replicas):  # copied from the centre at the top of the batch, noise on the carriers
        rep = copy.deepcopy(model)
        named = dict(rep.named_parameters())
        with torch.no_grad():
            for k, n in enumerate(order):
                named[n].view(-1)[where[n]] += std * noise[r][k]
        reps.append(rep)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    for n, p in model.named_parameters():
        if n in where:
            p.grad.view(-1)[where[n]] = 0.0
    optimizer.step()
    for rep in reps:
        opt = torch.optim.SGD(rep.parameters(), lr=replica_lr)
        opt.zero_grad()
        (-loss_fn(rep(x), y)).backward()
        opt.step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            update = sum(dict(rep.named_parameters())[n] for rep in reps) / replicas
            mask = torch.ones_like(p)
            if n in where:
                mask.view(-1)[where[n]] = 0.0
            p -= lam * mask * update
    return model


def test_tartaglione_step_equals_reference_replica_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    batch = (torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
    args = {"n_carriers": 12, "replicas": 3, "noise_std": 0.3, "lam": 0.05, "replica_lr": 0.5}
    method = METHODS.build("tartaglione", args)
    data = DataBundle("t", torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 3)
    key = method.keygen(model, data, torch.Generator().manual_seed(0))
    expected = reference_replica_update(copy.deepcopy(model), key, batch, 3, 0.3, 0.05, 0.5, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method.training_step(model, batch, nn.CrossEntropyLoss(), optimizer, key)
    for (n, p), (_, q) in zip(model.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


# --- Li -----------------------------------------------------------------------------------------


def _carrier_weights(model: nn.Module, key) -> tuple[torch.Tensor, torch.Tensor]:
    """The carriers' weights in the key's order, and their target signs (+1/-1)."""
    named = dict(model.named_parameters())
    values = torch.empty(len(key.tensors["flat_idx"]))
    for i, name in enumerate(key.meta["params"]):
        mask = key.tensors["param_id"] == i
        values[mask] = named[name].detach().view(-1)[key.tensors["flat_idx"][mask]]
    return values, 2.0 * (key.tensors["bits"] ^ key.tensors["pn"]).float() - 1.0


@pytest.mark.parametrize("insertion", ["flip", "floor"])
def test_li_insertion_writes_the_signs_and_flip_keeps_the_magnitudes(digits, insertion):
    """The paper's reading (flip): each carrier takes its target sign at its own magnitude. The
    version-2 control (floor): a wrong-signed carrier drops to 1e-3. Other weights are untouched."""
    torch.manual_seed(0)
    model = MODELS.build("small_cnn").build(digits)
    before = copy.deepcopy(model)
    key = METHODS.build("li_sign", {"bits": 64, "insertion": insertion}).keygen(model, digits, torch.Generator().manual_seed(0))
    written, target = _carrier_weights(model, key)
    original, _ = _carrier_weights(before, key)
    assert torch.equal(torch.sign(written), target)
    wrong = torch.sign(original) != target
    assert 0 < int(wrong.sum()) < 64
    if insertion == "flip":
        assert torch.equal(written.abs(), original.abs().clamp_min(1e-3))
    else:
        assert torch.equal(written[wrong].abs(), torch.full((int(wrong.sum()),), 1e-3))
        assert torch.equal(written[~wrong], original[~wrong])
    changed = sum(int((p != q).sum()) for p, q in zip(model.parameters(), before.parameters()))
    assert changed == int((written != original).sum())


def test_li_fine_tunes_without_constraint_unless_signs_are_kept(digits):
    """Free fine-tuning (the paper's) is a plain step; ``finetune_signs: kept`` keeps every sign."""
    from wmbench.api import plain_step

    assert METHODS.build("li_sign").step_fn(nn.Linear(2, 2), None) is plain_step
    model, key = train_small(digits, "li_sign", epochs=3, finetune_epochs=2, finetune_signs="kept", insertion="floor")
    named = dict(model.named_parameters())
    target = 2 * (key.tensors["bits"] ^ key.tensors["pn"]).long() - 1
    for i, name in enumerate(key.meta["params"]):
        mask = key.tensors["param_id"] == i
        signs = torch.sign(named[name].detach().view(-1)[key.tensors["flat_idx"][mask]]).long()
        assert torch.equal(signs, target[mask])
    assert METHODS.build("li_sign").detect(model, key).stat == 1.0


@pytest.mark.parametrize("budget,expected", [("shared", (2, 1)), ("extra", (3, 2))])
def test_li_trains_the_same_number_of_epochs_as_the_others(budget, expected):
    """Shared budget: pre-training + fine-tuning = training.epochs (fine-tuning at most half)."""
    from wmbench.registry import DATASETS
    from wmbench.train import Trainer, TrainingConfig

    data = DATASETS.build("digits", {"subset_train": 128}).load(None)
    model = MODELS.build("small_cnn", {"width": 4, "hidden": 8}).build(data)
    trainer = Trainer(data, TrainingConfig(epochs=3), CPU, torch.Generator().manual_seed(0), progress=False)
    key = METHODS.build("li_sign", {"finetune_epochs": 2, "bits": 16, "finetune_budget": budget}).embed(model, trainer, torch.Generator().manual_seed(1))
    assert (key.meta["pretrain_epochs"], key.meta["finetune_epochs"]) == expected
    assert len(trainer.epoch_seconds) == sum(expected)


def test_li_remove_negates_neurons_without_changing_the_function(trained, digits):
    model, key = trained["li_sign"]
    method = METHODS.build("li_sign")
    attacked = copy.deepcopy(model).eval()
    total = len(key.tensors["flat_idx"])
    assert method.remove(attacked, key, total, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(attacked(digits.test_x), model.eval()(digits.test_x), rtol=1e-5, atol=1e-5)
    result = method.detect(attacked, key)
    assert result.pvalue > 1e-3 and result.stat < 0.65


def test_li_remove_declines_without_batchnorm(digits):
    """No BatchNorm to compensate a negation (as on swin_t): no removal, so key_leak overwrites."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    method = METHODS.build("li_sign")
    key = method.keygen(model, digits, torch.Generator().manual_seed(0))
    assert not method.remove(model, key, len(key.tensors["flat_idx"]), torch.Generator().manual_seed(0))


def test_li_chooses_neurons_all_three_criteria_keep_on_resnet18():
    data = DataBundle("t", torch.randn(32, 3, 32, 32), torch.zeros(32, dtype=torch.long), torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), 10)
    torch.manual_seed(0)
    model = MODELS.build("resnet18").build(data)
    from wmbench.methods.li_sign import profile_convs

    pair, outputs = profile_convs(model, data.train_x[:4])
    assert len(pair) == 20 and pair["conv1"] == "bn1" and pair["layer3.1.conv2"] == "layer3.1.bn2"
    assert pair["layer2.0.downsample.0"] == "layer2.0.downsample.1" and outputs["conv1"].shape == (4, 64)
    key = METHODS.build("li_sign").keygen(model, data, torch.Generator().manual_seed(0))
    assert len(key.meta["convs"]) > 1 and all(bn is not None for bn in key.meta["bns"])
    assert len(key.tensors["flat_idx"]) == 256
    assert METHODS.build("li_sign").detect(model, key).stat == 1.0


def test_channel_entropy():
    from wmbench.methods.li_sign import channel_entropy

    values = torch.stack([torch.zeros(64), torch.arange(64.0)], 1)
    h = channel_entropy(values, 16)
    assert h[0] == 0.0 and h[1] == pytest.approx(torch.log(torch.tensor(16.0)).item(), rel=1e-5)


def test_li_fails_before_pretraining_when_the_model_cannot_hold_its_bits():
    """A key larger than half of every conv filter's weights fails at once, not after the
    pre-training epochs (an incompatible pair of a grid would pay them on every rerun)."""
    from wmbench.errors import ConfigError

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(10))  # capacity 2 x 5 = 10

    class NoTraining:
        config = type("Config", (), {"epochs": 4})()

        def fit(self, *args, **kwargs):
            raise AssertionError("pre-training started")

    with pytest.raises(ConfigError, match="at most 10"):
        METHODS.build("li_sign", {"bits": 11}).embed(model, NoTraining(), torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="needs Conv2d"):
        METHODS.build("li_sign", {"bits": 1}).embed(nn.Linear(4, 2), NoTraining(), torch.Generator().manual_seed(0))
