"""swin_t and the DeepLabV3 segmenters, the segmentation task (mIoU, ignore index 255), the
synthetic_segmentation and cityscapes datasets. Inputs are kept tiny: the models are large."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.attacks.scale import coupled_layers
from wmbench.data import IGNORE_INDEX, DataBundle
from wmbench.datasets.cityscapes import cityscapes_train_ids
from wmbench.errors import ConfigError
from wmbench.metrics import confusion_matrix, miou, miou_from_confusion, task_metric
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS
from wmbench.train import Trainer, TrainingConfig, task_loss

CPU = torch.device("cpu")


def bundle(x: torch.Tensor, y: torch.Tensor, num_classes: int, task: str) -> DataBundle:
    return DataBundle("t", x, y, x, y, num_classes, task)


@pytest.fixture(scope="module")
def seg64() -> DataBundle:
    return DATASETS.build("synthetic_segmentation", {"size": 64, "n_train": 4, "n_test": 2, "num_classes": 3}).load(None)


@pytest.fixture(scope="module")
def cls32() -> DataBundle:
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 4, "n_test": 2}).load(None)


def test_pixel_loss_is_the_labelled_mean_and_zero_without_labels():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = torch.randint(0, 3, (2, 4, 4))
    targets[0, :2] = IGNORE_INDEX
    loss = task_loss("segmentation")
    torch.testing.assert_close(loss(logits, targets), nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))
    unlabelled = loss(logits, torch.full_like(targets, IGNORE_INDEX))
    unlabelled.backward()
    assert unlabelled.item() == 0.0 and torch.all(logits.grad == 0)


# --- models: forward pass, then a WaterMAS embed/detect round trip ------------------------------------

SEGMENTERS = ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50"]


@pytest.mark.parametrize("arch", ["swin_t", *SEGMENTERS])
def test_forward_and_watermas_round_trip(arch, seg64, cls32):
    data = cls32 if arch == "swin_t" else seg64
    torch.manual_seed(0)
    model = MODELS.build(arch).build(data)
    with torch.no_grad():
        out = model.eval()(data.test_x[:1])
    expected = (1, data.num_classes) if arch == "swin_t" else (1, data.num_classes, 64, 64)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == expected
    trainer = Trainer(data, TrainingConfig(epochs=1, batch_size=4), CPU, torch.Generator().manual_seed(0), progress=False)
    method = METHODS.build("watermas", {"n_carriers": 256})
    key = method.embed(model, trainer, torch.Generator().manual_seed(1))
    assert method.detect(model, key).pvalue < 1e-6
    name, value = task_metric(model, data, CPU)
    assert name == ("accuracy" if arch == "swin_t" else "miou") and 0.0 <= value <= 1.0


def test_segmenters_take_the_data_channels_name_parameters_like_torchvision_and_check_the_task():
    data = bundle(torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long), 5, "segmentation")
    model = MODELS.build("deeplabv3_mobilenet_v3_large").build(data)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "backbone.0.0.weight" and model.get_submodule("backbone.0.0").in_channels == 1
    assert any(n.startswith("classifier.") for n in names) and not any("aux" in n for n in names)
    assert tuple(model.eval()(torch.zeros(1, 1, 16, 16)).shape) == (1, 5, 16, 16)
    with pytest.raises(ConfigError, match="swin_t is a classification model"):
        MODELS.build("swin_t").build(data)
    with pytest.raises(ConfigError, match="segmentation model"):
        MODELS.build("deeplabv3_resnet50").build(bundle(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), 5, "classification"))


# --- the scale attack keeps the function (float64, eval mode, one forward pair) -----------------------

# (architecture, BN-rule pairs, ReLU-rule pairs): swin_t has LayerNorm and GELU only, and its
# attention weights are used through F.linear: no coupling, the attack is the identity and says so.
SCALE_ARCHS = [("deeplabv3_mobilenet_v3_large", 53, 8), ("deeplabv3_resnet50", 60, 0), ("swin_t", 0, 0)]


@pytest.mark.parametrize("arch,n_bn,n_relu", SCALE_ARCHS)
def test_scale_keeps_the_output(arch, n_bn, n_relu, seg64, cls32):
    data = cls32 if arch == "swin_t" else seg64
    torch.manual_seed(0)
    model = MODELS.build(arch).build(data).double().eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # BN running statistics away from (0, 1), without a forward pass
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
    bn, relu = coupled_layers(model)
    assert (len(bn), len(relu)) == (n_bn, n_relu)
    x = data.test_x[:1].double()
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=CPU)
    attacked = ATTACKS.build("scale", {"negate": True}).apply(model, 1.0, ctx)
    with torch.no_grad():
        reference, out = model(x), attacked(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    moved = any(not torch.equal(p, q) for p, q in zip(attacked.parameters(), model.parameters()))
    if n_bn + n_relu:
        assert 0.4 < ctx.effect < 0.6 and moved
    else:
        assert ctx.effect == 0.0 and not moved and "no function-preserving coupling" in ctx.notes["detect_note"]


# --- mIoU --------------------------------------------------------------------------------------------

TARGET = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
PRED = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])


def test_confusion_matrix_ignores_255():
    c = confusion_matrix(PRED, TARGET, 3)
    assert c.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: target, columns: prediction
    assert int(c.sum()) == 6  # the two 255 pixels are not counted, whatever was predicted there


def test_miou_by_hand():
    # IoU_0 = 1 / (1 + 1 FP + 1 FN) = 1/3, IoU_1 = 2 / 3, IoU_2 = 1 / 2: mean 1/2
    assert miou_from_confusion(confusion_matrix(PRED, TARGET, 3)) == pytest.approx(0.5)
    # class 3 neither occurs nor is predicted: left out of the mean
    assert miou_from_confusion(confusion_matrix(PRED, TARGET, 4)) == pytest.approx(0.5)
    # class 3 predicted (on a target-0 pixel) but absent from the targets: counts, with IoU 0
    pred = PRED.clone()
    pred[0, 0, 0] = 3
    assert miou_from_confusion(confusion_matrix(pred, TARGET, 4)) == pytest.approx((0 + 2 / 3 + 1 / 2 + 0) / 4)
    assert miou_from_confusion(confusion_matrix(TARGET.clamp(max=2), TARGET, 3)) == 1.0
    assert miou_from_confusion(confusion_matrix(PRED, torch.full_like(TARGET, IGNORE_INDEX), 3)) == 0.0


def test_miou_on_a_model_accumulates_over_batches():
    # the "model" is the identity on one-hot inputs: it predicts exactly PRED, split over two images
    target = TARGET.reshape(2, 1, 4)
    x = nn.functional.one_hot(PRED.reshape(2, 1, 4), 3).permute(0, 3, 1, 2).float()
    data = bundle(x, target, 3, "segmentation")
    assert miou(nn.Identity(), data, CPU, batch_size=1) == pytest.approx(0.5)
    assert task_metric(nn.Identity(), data, CPU) == ("miou", pytest.approx(0.5))
    logits = torch.eye(3)[[0, 1, 2, 2]]
    assert task_metric(nn.Identity(), bundle(logits, torch.tensor([0, 1, 2, 0]), 3, "classification"), CPU) == ("accuracy", 0.75)


# --- datasets ----------------------------------------------------------------------------------------


def test_synthetic_segmentation(seg64):
    assert seg64.task == "segmentation" and seg64.train_x.shape == (4, 3, 64, 64) and seg64.train_y.shape == (4, 64, 64)
    y = seg64.train_y
    assert y.dtype == torch.int64 and set(y.unique().tolist()) == {0, 1, 2, IGNORE_INDEX}
    assert 0.02 < float((y == IGNORE_INDEX).float().mean()) < 0.1
    again = DATASETS.build("synthetic_segmentation", {"size": 64, "n_train": 4, "n_test": 2, "num_classes": 3}).load(None)
    assert torch.equal(again.train_x, seg64.train_x) and torch.equal(again.test_y, seg64.test_y)


def test_cityscapes_train_id_table():
    table = cityscapes_train_ids()
    assert table[7] == 0 and table[8] == 1 and table[26] == 13 and table[33] == 18  # road, sidewalk, car, bicycle
    assert table[0] == 255 and table[6] == 255 and table[255] == 255  # unlabeled, ground, out of range
    assert sorted(set(table.tolist()) - {255}) == list(range(19))


def write_cityscapes(root, split: str, name: str, color: tuple[int, int, int], left_id: int, right_id: int) -> None:
    from PIL import Image

    (root / "leftImg8bit" / split / "city").mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / "city").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 16), color).save(root / "leftImg8bit" / split / "city" / f"{name}_leftImg8bit.png")
    ids = np.full((16, 32), left_id, dtype=np.uint8)
    ids[:, 16:] = right_id
    Image.fromarray(ids, mode="L").save(root / "gtFine" / split / "city" / f"{name}_gtFine_labelIds.png")


def test_cityscapes_loads_a_fake_tree(tmp_path, monkeypatch):
    root = tmp_path / "cityscapes"
    write_cityscapes(root, "train", "city_000001_000019", (255, 0, 0), 7, 26)  # road | car
    write_cityscapes(root, "train", "city_000000_000019", (0, 0, 0), 0, 33)  # unlabeled | bicycle
    write_cityscapes(root, "val", "city_000002_000019", (0, 255, 0), 8, 4)  # sidewalk | static (ignored)
    dataset = DATASETS.build("cityscapes", {"root": str(root), "size": [8, 16]})
    data = dataset.load(tmp_path / "cache")
    assert data.task == "segmentation" and data.num_classes == 19
    assert data.train_x.shape == (2, 3, 8, 16) and data.train_y.shape == (2, 8, 16) and data.test_y.shape == (1, 8, 16)
    assert data.train_y.dtype == torch.int64
    # sorted by file name: city_000000 first
    assert data.train_y[0, :, :8].unique().tolist() == [255] and data.train_y[0, :, 8:].unique().tolist() == [18]
    assert data.train_y[1, :, :8].unique().tolist() == [0] and data.train_y[1, :, 8:].unique().tolist() == [13]
    assert data.test_y[0, :, :8].unique().tolist() == [1] and data.test_y[0, :, 8:].unique().tolist() == [255]
    red = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    torch.testing.assert_close(data.train_x[1, :, 0, 0], red)
    monkeypatch.setattr("wmbench.datasets.cityscapes._read_cityscapes", None)  # the decoded tensors are cached: no re-read
    cached = dataset.load(tmp_path / "cache")
    assert torch.equal(cached.train_x, data.train_x) and torch.equal(cached.train_y, data.train_y)
    subset = DATASETS.build("cityscapes", {"root": str(root), "size": [8, 16], "subset_train": 1}).load(tmp_path / "cache")
    assert len(subset.train_x) == 1


def test_cityscapes_root_errors(tmp_path):
    with pytest.raises(ConfigError, match="root is required"):
        DATASETS.build("cityscapes")
    with pytest.raises(ConfigError, match="size"):
        DATASETS.build("cityscapes", {"root": "x", "size": [8]})
    with pytest.raises(ConfigError) as info:
        DATASETS.build("cityscapes", {"root": str(tmp_path / "missing")}).load(tmp_path)
    assert info.value.field == "root" and "not found" in str(info.value)


def test_uchida_takes_a_linear_layer_on_swin_t(cls32):
    from wmbench.methods.uchida import default_layer

    model = MODELS.build("swin_t").build(cls32)  # its only conv, the patch embedding, has w_bar of 48 values
    assert default_layer(model) == "features.5.3.mlp.0" and model.get_submodule("features.5.3.mlp.0").in_features >= 256
