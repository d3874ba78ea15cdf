"""Model components: a small CNN for CPU work and torchvision architectures (never pretrained).

Classifiers return logits (N, num_classes); segmentation models return per-pixel logits
(N, num_classes, H, W) at the input's resolution, a plain tensor (not torchvision's dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from wmbench.api import bounded
from wmbench.data import DataBundle
from wmbench.errors import ConfigError
from wmbench.registry import MODELS


class Model:
    """A model component: a frozen dataclass whose ``build`` makes a freshly initialised module.
    ``task`` is the DataBundle task its output fits (``check_task`` refuses the others)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    task: ClassVar[str] = "classification"

    def build(self, data: DataBundle) -> nn.Module:
        raise NotImplementedError

    def check_task(self, data: DataBundle) -> None:
        """A ConfigError when ``data`` is a task this model does not solve (a classifier on
        segmentation data would fail deep inside the loss)."""
        if data.task != self.task:
            raise ConfigError("models", f"{self.name} is a {self.task} model; dataset {data.name} is a {data.task} task")


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear modules of ``model``, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weight_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> weight parameter of every Conv/Linear layer (the tensors attacks and marks act on)."""
    return {f"{n}.weight": m.weight for n, m in conv_layers(model)}


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Make the first Conv2d accept ``in_channels`` (torchvision models assume RGB)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,  # type: ignore[arg-type]
                module.stride,  # type: ignore[arg-type]
                module.padding,  # type: ignore[arg-type]
                bias=module.bias is not None,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return model
    return model


@MODELS.register("small_cnn")
@dataclass(frozen=True)
class SmallCNN(Model):
    """Two Conv-BN-ReLU blocks, global pooling and a two-layer ReLU head; sized for digits on a CPU."""

    width: int = bounded(16, ge=1, le=4096)
    hidden: int = bounded(64, ge=1, le=65536)

    def build(self, data: DataBundle) -> nn.Module:
        self.check_task(data)
        w = self.width
        return nn.Sequential(
            nn.Conv2d(data.in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, data.num_classes),
        )


@dataclass(frozen=True)
class TorchvisionClassifier(Model):
    """A torchvision classification architecture, randomly initialised, ``num_classes`` from the data."""

    arch: ClassVar[str]

    def build(self, data: DataBundle) -> nn.Module:
        import torchvision

        self.check_task(data)
        model = torchvision.models.get_model(self.arch, weights=None, num_classes=data.num_classes)
        return replace_first_conv(model, data.in_channels)


@MODELS.register("resnet18")
@dataclass(frozen=True)
class ResNet18(TorchvisionClassifier):
    """torchvision ResNet-18 (He et al. 2016), randomly initialised."""

    arch: ClassVar[str] = "resnet18"


@MODELS.register("vgg16")
@dataclass(frozen=True)
class VGG16(TorchvisionClassifier):
    """torchvision VGG-16 (Simonyan and Zisserman 2015), randomly initialised."""

    arch: ClassVar[str] = "vgg16"


@MODELS.register("mobilenet_v3_small")
@dataclass(frozen=True)
class MobileNetV3Small(TorchvisionClassifier):
    """torchvision MobileNetV3-Small (Howard et al. 2019), randomly initialised."""

    arch: ClassVar[str] = "mobilenet_v3_small"


@MODELS.register("swin_t")
@dataclass(frozen=True)
class SwinT(TorchvisionClassifier):
    """torchvision Swin-T (Liu et al. 2021), randomly initialised.

    Any input of at least 4x4 pixels runs: torchvision pads each stage's feature map to a multiple
    of the 7x7 window and drops the shift where one window covers the padded map. A 32x32 CIFAR
    image gives feature maps of 8, 4, 2 and 1 pixels: from the second stage on, attention is global
    and unshifted. The only conv is the 4x4 patch embedding ``features.0.0``."""

    arch: ClassVar[str] = "swin_t"


class SegmentationLogits(nn.Module):
    """torchvision's ``_SimpleSegmentationModel`` (DeepLabV3, FCN, ...) without the auxiliary head,
    returning the ``"out"`` logits (N, C, H, W) as a plain tensor instead of a dict.

    It adopts the wrapped model's ``backbone`` and ``classifier``, so the parameter names are
    torchvision's own (``backbone.conv1.weight``, ``classifier.0.convs.0.0.weight``...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "aux_classifier", None) is not None:
            raise ValueError("SegmentationLogits: build the model with aux_loss=False")
        self.backbone = model.backbone
        self.classifier = model.classifier

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        features = self.backbone(x)["out"]
        return F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class TorchvisionSegmenter(Model):
    """A torchvision segmentation architecture, randomly initialised (backbone included), without
    the auxiliary head; ``num_classes`` from the data. Returns logits (N, C, H, W)."""

    arch: ClassVar[str]
    task: ClassVar[str] = "segmentation"

    def build(self, data: DataBundle) -> nn.Module:
        import torchvision

        self.check_task(data)
        model = torchvision.models.get_model(
            self.arch, weights=None, weights_backbone=None, aux_loss=False, num_classes=data.num_classes
        )
        return replace_first_conv(SegmentationLogits(model), data.in_channels)


@MODELS.register("deeplabv3_mobilenet_v3_large")
@dataclass(frozen=True)
class DeepLabV3MobileNetV3Large(TorchvisionSegmenter):
    """torchvision DeepLabV3 (Chen et al. 2017) on a MobileNetV3-Large backbone, randomly initialised.

    Output stride 16 (any input size runs; below 16x16 the feature map is a single pixel). The ASPP
    pooling branch is a BatchNorm over a 1x1 map, so training needs batches of at least 2."""

    arch: ClassVar[str] = "deeplabv3_mobilenet_v3_large"


@MODELS.register("deeplabv3_resnet50")
@dataclass(frozen=True)
class DeepLabV3ResNet50(TorchvisionSegmenter):
    """torchvision DeepLabV3 (Chen et al. 2017) on a ResNet-50 backbone, randomly initialised.

    Dilated backbone (output stride 8); about 40M parameters."""

    arch: ClassVar[str] = "deeplabv3_resnet50"
