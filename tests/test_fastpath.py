"""The training recipe (augmentation, schedules, label smoothing, Nesterov) and the fast path (data
held on the device as uint8, channels-last inputs, bf16 autocast): defaults train as before, bit
for bit; the carriers of every carrier method survive the fast path bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
from torch import nn

from wmbench.api import plain_step
from wmbench.augment import Augment
from wmbench.data import IGNORE_INDEX, DataBundle
from wmbench.datasets.decoded import DecodedSplits, uint8_bundle
from wmbench.datasets.synthetic import Synthetic
from wmbench.grid import training_identity
from wmbench.image_mark import CarrierSet
from wmbench.registry import METHODS, MODELS, build_dataclass
from wmbench.schedules import lr_factor
from wmbench.train import Trainer, TrainingConfig, task_loss
from wmbench.errors import ConfigError


def tiny_uint8_data(n: int = 96, size: int = 16, seed: int = 0) -> DataBundle:
    """A uint8-backed bundle (as cifar10 and cityscapes load), labels from a fixed linear teacher."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n + 32, 3, size, size), generator=g, dtype=torch.uint8)
    teacher = torch.randn(3 * size * size, 4, generator=g)
    labels = (images.float().flatten(1) @ teacher).argmax(1)
    splits = DecodedSplits(images[:n], labels[:n], images[n:], labels[n:])
    return uint8_bundle("tiny", splits, None, None, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 4)


def old_fit(model: nn.Module, data: DataBundle, config: TrainingConfig, generator: torch.Generator, step) -> None:  # type: ignore[no-untyped-def]
    """The training loop as it was before the recipe and the fast path (wmbench 0.x, TRAIN_FORMAT 1)."""
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data.train_x, data.train_y
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:
                continue
            step(model, (x[idx], y[idx]), loss_fn, opt)
        sched.step()
    model.eval()


def build(name: str, data: DataBundle, **args) -> nn.Module:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return MODELS.build(name, args).build(data)


@pytest.mark.parametrize("dataset,method", [("float", "plain"), ("uint8", "plain"), ("uint8", "watermas")])
def test_default_training_is_bit_identical_to_the_old_loop(dataset: str, method: str) -> None:
    data = Synthetic(n_train=97, size=8).load(None) if dataset == "float" else tiny_uint8_data(97, 8)  # type: ignore[arg-type]
    config = TrainingConfig(epochs=3, batch_size=16, lr=0.05, milestones=[2])
    ref, new = build("small_cnn", data, width=4, hidden=8), build("small_cnn", data, width=4, hidden=8)
    steps = []
    for model in (ref, new):
        if method == "plain":
            steps.append(plain_step)
        else:
            m = METHODS.build(method, {"n_carriers": 16})
            steps.append(m.step_fn(model, m.keygen(model, data, torch.Generator().manual_seed(1))))
    old_fit(ref, data, config, torch.Generator().manual_seed(3), steps[0])
    Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(3), progress=False).fit(new, steps[1])
    for (name, a), b in zip(ref.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), name


def test_default_recipe_fields_leave_old_training_ids_unchanged() -> None:
    old = {"epochs": 4, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [2], "gamma": 0.1}
    assert training_identity(TrainingConfig(**old)) == old
    assert training_identity(TrainingConfig(**old, flip=True)) == {**old, "flip": True}
    assert training_identity(TrainingConfig(**old, lookahead=False)) == old


def test_uint8_bundle_keeps_the_raw_images_that_normalise_to_train_x() -> None:
    from wmbench.data import normalize

    data = tiny_uint8_data()
    assert data.train_u8 is not None and data.train_u8.dtype == torch.uint8
    assert torch.equal(normalize(data.train_u8[5:9], data.mean, data.std), data.train_x[5:9])  # type: ignore[arg-type]


@pytest.mark.parametrize("aug", [Augment(translate=2), Augment(flip=True), Augment(cutout=4), Augment(2, True, 4)])
def test_augmentation_is_seeded_shape_preserving_and_changes_images(aug: Augment) -> None:
    x = torch.randn(32, 3, 16, 16)
    y = torch.arange(32)
    a, ya = aug(x, y, torch.Generator().manual_seed(1))
    b, _ = aug(x, y, torch.Generator().manual_seed(1))
    c, _ = aug(x, y, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(ya, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)


def test_translate_is_a_shift_of_the_reflect_padded_image_and_flip_a_mirror() -> None:
    x = torch.randn(64, 2, 8, 8)
    out, _ = Augment(translate=2)(x, torch.zeros(64), torch.Generator().manual_seed(0))
    padded = nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(64):
        assert any(torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5))
    flipped, _ = Augment(flip=True)(x, torch.zeros(64), torch.Generator().manual_seed(0))
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(64)]
    assert all(m or torch.equal(flipped[i], x[i]) for i, m in enumerate(mirrored)) and 10 < sum(mirrored) < 54


def test_label_maps_move_with_their_images() -> None:
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    y = x[:, 0].long()  # a label map equal to the image
    out, labels = Augment(translate=2, flip=True)(x, y, torch.Generator().manual_seed(0))
    inside = labels != IGNORE_INDEX
    assert inside.any() and torch.equal(out[:, 0][inside].long(), labels[inside])


def test_per_batch_schedules_warm_up_then_decay() -> None:
    f = [lr_factor("warmup_linear", s, 100, 10) for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0 and f[10] == 1.0 and f[50] > f[90] > f[99] > 0
    g = [lr_factor("onecycle", s, 100, 0) for s in range(100)]
    assert max(g) == 1.0 and g[0] == pytest.approx(1 / 25) and g[99] < 0.01


def test_label_smoothing_and_nesterov_reach_the_loss_and_optimiser() -> None:
    logits, targets = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert task_loss("classification", 0.2)(logits, targets) == pytest.approx(
        float(nn.functional.cross_entropy(logits, targets, label_smoothing=0.2))
    )
    data = Synthetic(n_train=32, size=8).load(None)  # type: ignore[arg-type]
    opt = Trainer(data, TrainingConfig(nesterov=True), torch.device("cpu"), torch.Generator()).optimizer(nn.Linear(2, 2))
    assert opt.param_groups[0]["nesterov"] is True


def test_scenario_rejects_out_of_range_recipe_fields() -> None:
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_dataclass(TrainingConfig, {"label_smoothing": 1.5}, "training")
    with pytest.raises(ConfigError, match="translate"):
        build_dataclass(TrainingConfig, {"translate": -1}, "training")
    with pytest.raises(ConfigError, match="schedule"):
        build_dataclass(TrainingConfig, {"schedule": "cosine"}, "training")


def test_recipe_learns_on_tiny_data() -> None:
    data = tiny_uint8_data(256, 16)
    config = TrainingConfig(epochs=6, batch_size=32, lr=0.05, nesterov=True, label_smoothing=0.1, schedule="warmup_linear",
                            warmup_epochs=1, translate=1, flip=True, channels_last=True)
    model = build("cifar_speednet", data, stem=8, widths=[16, 16, 16])
    before = nn.functional.cross_entropy(model.eval()(data.train_x), data.train_y)
    Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False).fit(model, plain_step)
    after = nn.functional.cross_entropy(model(data.train_x), data.train_y)
    assert after < before


FAST = dict(epochs=2, batch_size=32, lr=0.05, nesterov=True, label_smoothing=0.1, schedule="onecycle",
            translate=2, flip=True, cutout=4, channels_last=True, precision="bf16", lookahead=True)


@pytest.mark.parametrize("method", ["watermas", "tartaglione"])
def test_carriers_survive_the_fast_path_bit_identically(method: str) -> None:
    data = tiny_uint8_data(64, 16)
    model = build("cifar_speednet", data, stem=8, widths=[8, 16, 16])
    trainer = Trainer(data, TrainingConfig(**FAST), torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    before = copy.deepcopy(model.state_dict())
    key = METHODS.build(method, {"n_carriers": 64}).embed(model, trainer, torch.Generator().manual_seed(1))
    carriers = CarrierSet.bind(model, key)
    got = torch.cat([p.detach().view(-1)[i] for p, i in zip(carriers.params, carriers.indices)])
    assert torch.equal(got, torch.cat(carriers.per_param(key.tensors["values"])))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained


@pytest.mark.parametrize("method", ["uchida", "li_sign"])
def test_baselines_embed_detectably_on_the_fast_path(method: str) -> None:
    data = tiny_uint8_data(64, 16)
    model = build("cifar_speednet", data, stem=8, widths=[16, 32, 32])
    config = TrainingConfig(**{**FAST, "epochs": 6, "schedule": "warmup_linear"})
    trainer = Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    args = {"bits": 32, "lam": 1.0} if method == "uchida" else {"bits": 32, "finetune_epochs": 1}
    m = METHODS.build(method, args)
    key = m.embed(model, trainer, torch.Generator().manual_seed(1))
    assert float(m.extract(model, key).eq(key.tensors["bits"].float()).float().mean()) == 1.0


def test_speednet_refuses_images_too_small() -> None:
    data = Synthetic(n_train=8, size=8).load(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 16x16"):
        MODELS.build("cifar_speednet").build(data)


def test_channels_last_default_comes_from_the_model() -> None:
    from wmbench.train import FastPath

    data = tiny_uint8_data(8, 16)
    config = TrainingConfig()
    assert FastPath.for_model(build("cifar_speednet", data), config, torch.device("cpu")).channels_last
    assert not FastPath.for_model(build("small_cnn", data), config, torch.device("cpu")).channels_last
    assert not FastPath.for_model(build("cifar_speednet", data), dataclasses.replace(config, channels_last=False), torch.device("cpu")).channels_last
    assert not FastPath.for_model(build("cifar_speednet", data), config, torch.device("cuda")).channels_last  # slower on an H200
    assert FastPath.for_model(build("cifar_speednet", data), dataclasses.replace(config, channels_last=True), torch.device("cuda")).channels_last


def test_whitening_stem_decorrelates_the_training_patches() -> None:
    """``whiten: true``: the stem's first filters turn 2x2 patches of the (correlated) training
    images into responses with identity covariance; the other filters are their negatives."""
    from wmbench.speednet import stem_whitening

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 3, 16, 16, generator=g)
    x[:, 1] = 0.9 * x[:, 0] + 0.1 * x[:, 1]  # correlated channels
    data = DataBundle("w", x, torch.zeros(600, dtype=torch.long), x[:8], torch.zeros(8, dtype=torch.long), 4)
    plain, whitened = (build("cifar_speednet", data, widths=[8, 8, 8], whiten=w) for w in (False, True))
    weight = whitened.stem[0].weight.detach().double()
    assert torch.equal(weight[12:], -weight[:12]) and not torch.equal(weight, plain.stem[0].weight.detach().double())
    patches = x.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    cov = torch.cov((patches @ weight[:12].reshape(12, -1).T).T)
    torch.testing.assert_close(cov, torch.diag(cov.diag()), atol=1e-4, rtol=0)
    assert cov.diag()[:8].sub(1).abs().max() < 0.01  # the largest directions reach unit variance (eps aside)
    assert torch.equal(stem_whitening(x), stem_whitening(x))  # data-dependent, not random


def test_dirac_init_starts_every_block_conv_as_a_partial_identity() -> None:
    """``dirac: true``: each block conv's first in-channels filters copy their input channel."""
    data = tiny_uint8_data(8, 16)
    net = build("cifar_speednet", data, stem=4, widths=[4, 8, 8], dirac=True)
    convs = [m for m in net.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    x = torch.randn(2, 8, 5, 5)
    for conv in convs:
        n = conv.in_channels
        out = nn.functional.conv2d(x[:, :n], conv.weight, padding=1)
        assert torch.equal(out[:, :n], x[:, :n]), conv
    plain = build("cifar_speednet", data, stem=4, widths=[4, 8, 8])
    assert not torch.equal(next(m for m in plain.blocks.modules() if isinstance(m, nn.Conv2d)).weight[:4], convs[0].weight[:4])


def test_frozen_bn_scales_stay_one_and_bias_lr_scale_groups_the_vectors() -> None:
    """``bn_weight: false`` keeps BatchNorm scales at 1 through training; ``bias_lr_scale`` puts
    the 1-D parameters in a group at lr x scale and weight decay / scale."""
    data = tiny_uint8_data(64, 16)
    net = build("cifar_speednet", data, stem=4, widths=[4, 4, 4], bn_weight=False)
    config = TrainingConfig(epochs=2, batch_size=16, lr=0.05, bias_lr_scale=64)
    trainer = Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    groups = trainer.optimizer(net).param_groups
    assert [g["lr"] for g in groups] == [0.05, 0.05 * 64] and groups[1]["weight_decay"] == config.weight_decay / 64
    assert all(p.dim() == 1 for p in groups[1]["params"]) and all(p.dim() != 1 for p in groups[0]["params"])
    biases = [m.bias.detach().clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    trainer.fit(net, plain_step)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert all(not torch.equal(m.bias, b) for m, b in zip(bns, biases))
    default = Trainer(data, TrainingConfig(), torch.device("cpu"), torch.Generator(), progress=False)
    assert len(default.optimizer(net).param_groups) == 1


def test_progress_lines_print_one_line_per_epoch_and_no_bar(capsys) -> None:
    data = tiny_uint8_data(64, 16)
    model = build("cifar_speednet", data, stem=8, widths=[8, 8, 8])
    config = TrainingConfig(epochs=3, batch_size=32)
    Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), "train x/seed0", progress="lines").fit(model, plain_step)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(", loss")[0] for line in lines] == [f"train x/seed0: epoch {e}/3" for e in (1, 2, 3)]


def test_a_shipped_worker_keeps_its_progress_mode(tmp_path) -> None:
    import pickle

    from wmbench.scenario import parse_scenario
    from wmbench.worker import CellWorker

    doc = {"name": "p", "datasets": ["digits"], "models": ["small_cnn"], "methods": ["none"], "training": {"epochs": 1}}
    worker = CellWorker(parse_scenario(doc, tmp_path), tmp_path / "cache", "cpu", progress="lines")
    assert pickle.loads(pickle.dumps(worker)).progress == "lines"  # what the Ray executor ships


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_keeps_carriers_bit_identical_and_quiet(capfd) -> None:
    """``compile: true`` on the CPU: the compiled forward trains, frozen WaterMAS carriers stay
    bit-identical under bf16, and torch's "No CUDA runtime is found" notice stays out of stderr."""
    data = tiny_uint8_data(64, 16)
    model = build("cifar_speednet", data, stem=8, widths=[8, 16, 16])
    config = TrainingConfig(**{**FAST, "epochs": 1, "compile": True})
    trainer = Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    before = copy.deepcopy(model.state_dict())
    key = METHODS.build("watermas", {"n_carriers": 64}).embed(model, trainer, torch.Generator().manual_seed(1))
    carriers = CarrierSet.bind(model, key)
    got = torch.cat([p.detach().view(-1)[i] for p, i in zip(carriers.params, carriers.indices)])
    assert torch.equal(got, torch.cat(carriers.per_param(key.tensors["values"])))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "No CUDA runtime" not in capfd.readouterr().err


@pytest.mark.parametrize("method", ["hufunet", "deepsigns", "watermas", "li_sign"])
def test_compile_changes_how_fast_a_method_trains_not_what(method, digits, monkeypatch) -> None:
    """``compile: true`` hands the step torch.compile's wrapper, whose tensors and layers are named
    ``_orig_mod.<name>``: HufuNet's retuning looked its carriers up there and DeepSigns its probed
    layer (both NotApplicable, every such training failed, on the CPU and CUDA alike). Each method
    now trains to the same weights as without ``compile`` (torch.compile's eager backend: the
    wrapper and the tracing as in a real run, none of inductor's float reordering)."""
    from functools import partial

    from wmbench.data import take_subset

    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="eager"))
    x, y = take_subset(digits.train_x, digits.train_y, 192)
    data = dataclasses.replace(digits, train_x=x, train_y=y)
    args = {"finetune_epochs": 1} if method == "li_sign" else {}
    trained = []
    for compiled in (False, True):
        model = build("small_cnn", data, width=8, hidden=16)
        config = TrainingConfig(epochs=2, batch_size=64, compile=compiled)
        trainer = Trainer(data, config, torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
        with torch.random.fork_rng(devices=[]):
            METHODS.build(method, args).embed(model, trainer, torch.Generator().manual_seed(1))
        trained.append(model.state_dict())
    plain, compiled_state = trained
    assert all(torch.equal(plain[k], compiled_state[k]) for k in plain)


def test_hufunet_retunes_in_float32_inside_a_bf16_autocast_step() -> None:
    """HufuNet retunes its encoder inside the training step; under ``precision: bf16`` on the CPU
    that ran the autoencoder in bf16, while a CUDA autocast leaves the key's CPU tensors in float32:
    both devices now retune in float32."""
    from wmbench.methods.hufunet import train_autoencoder

    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 64, generator=g)  # 8 x 8 grey images, flattened
    tensors = [torch.randn(16, 64, generator=g) / 8, torch.zeros(16), torch.randn(64, 16, generator=g) / 4, torch.zeros(64)]
    plain = train_autoencoder(images, tensors, False, 5, 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = train_autoencoder(images, tensors, False, 5, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(plain, autocast))
