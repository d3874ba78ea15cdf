"""Model components: a small CNN for CPU work and torchvision architectures (never pretrained)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from wmbench.data import DataBundle
from wmbench.registry import MODELS


class Model:
    """A model component: a frozen dataclass whose ``build`` makes a freshly initialised module."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"

    def build(self, data: DataBundle) -> nn.Module:
        raise NotImplementedError


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

    width: int = 16
    hidden: int = 64

    def build(self, data: DataBundle) -> nn.Module:
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
