"""Model components: a small CNN for CPU work and torchvision architectures (never pretrained).

Classifiers return logits (N, num_classes); segmentation models return per-pixel logits
(N, num_classes, H, W) at the input's resolution, a plain tensor (not torchvision's dict)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wmbench.api import bounded
from wmbench.data import DataBundle
from wmbench.errors import ConfigError
from wmbench.registry import MODELS, closest


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


ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def forward_calls(model: nn.Module, example: Tensor, kinds: tuple[type[nn.Module], ...]) -> tuple[Any, list[tuple[nn.Module, Any]]]:
    """The model's output for ``example`` (no gradients) and, in call order, each module of
    ``kinds`` that ran, with its output (found by forward hooks, removed after)."""
    ran: list[tuple[nn.Module, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: ran.append((mod, out))) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    return out, ran


def weight_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, module, attribute) of every convolution and Linear weight and every
    ``nn.MultiheadAttention`` query/key/value projection, in definition order."""
    for n, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            attrs: tuple[str, ...] = ("weight",)
        elif isinstance(m, nn.MultiheadAttention):
            attrs = ATTENTION_WEIGHTS
        else:
            continue
        for attr in attrs:
            yield (f"{n}.{attr}" if n else attr), m, attr


def weight_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> weight parameter of every convolution, Linear layer and attention projection, in
    definition order: the tensors attacks and marks act on. ``nn.MultiheadAttention`` (torchvision's
    ViT) holds its query/key/value projection as a bare parameter, not a Linear layer; it counts
    (its output projection is a Linear layer). A weight shared by two layers (tied weights) is
    listed once, under its first name, as ``named_parameters`` lists it."""
    found: dict[str, nn.Parameter] = {}
    for name, m, attr in weight_slots(model):
        p = getattr(m, attr)
        if p is not None and all(p is not q for q in found.values()):
            found[name] = p
    return found


def computed_weight(model: nn.Module) -> str | None:
    """The name of the first of ``weight_slots`` that is no parameter of its layer but computed
    from other tensors at each forward (``torch.nn.utils.parametrize``, as
    ``parametrizations.weight_norm`` and ``spectral_norm`` do, or the older ``weight_norm`` hook), or None."""
    return next((name for name, m, attr in weight_slots(model) if getattr(m, attr, None) is not None and attr not in m._parameters), None)


def first_conv(model: nn.Module, in_channels: int = 3, size: int = 64) -> tuple[str, nn.Conv2d] | None:
    """The (name, module) of the first Conv2d the forward pass applies (found by forward hooks on an
    ``in_channels`` x ``size`` x ``size`` input); the first in definition order if the pass fails."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    order: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _i, i=i: order.append(i)) for i, (_, m) in enumerate(convs)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, size, size))
    except Exception:  # noqa: BLE001 - too small an input, or no image model: fall back to definition order
        pass
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return convs[order[0]] if order else convs[0]


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Make the first Conv2d the forward pass applies accept ``in_channels`` (torchvision models
    assume RGB); its other settings (kernel, stride, padding, dilation, bias) are kept."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs or convs[0].in_channels == in_channels:  # the usual case: no forward probe needed
        return model
    found = first_conv(model)
    if found is None or found[1].in_channels == in_channels:
        return model
    name, module = found
    if module.groups != 1:
        raise ConfigError("models", f"the first convolution {name} is grouped: cannot adapt it to {in_channels} input channels")
    new = nn.Conv2d(
        in_channels,
        module.out_channels,
        module.kernel_size,  # type: ignore[arg-type]
        module.stride,  # type: ignore[arg-type]
        module.padding,  # type: ignore[arg-type]
        module.dilation,  # type: ignore[arg-type]
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
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


def torchvision_classifiers() -> list[str]:
    """The classification architectures of the installed torchvision (``torchvision.models``)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


# Builder options some architectures need to return plain logits (no auxiliary heads, no RGB-only
# input transform); an entry's own ``options`` take precedence.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "transform_input": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "transform_input": False, "init_weights": True},
}


@MODELS.register("torchvision")
@dataclass(frozen=True)
class AnyTorchvision(Model):
    """Any torchvision classification architecture by name (``arch``, as in
    torchvision.models.list_models(): resnet50, shufflenet_v2_x0_5, regnet_x_400mf, convnext_tiny,
    efficientnet_b0, vit_b_16, ...), randomly initialised (never pretrained, nothing downloaded).
    ``num_classes`` comes from the dataset, and the first convolution is replaced when the data
    has other than 3 channels. ``options`` are passed to torchvision's builder, e.g.
    ``{image_size: 32}`` for vit_b_16 or ``{dropout: 0.0}``. Small inputs (digits are 8x8) suit
    architectures with adaptive pooling; for others the pre-flight reports the pair as not
    running on those inputs (exit 2 for a one-pair scenario; in a grid, that pair's cells fail)."""

    arch: str = ""
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = torchvision_classifiers()
        if not self.arch:
            raise ConfigError("arch", "required: a torchvision classification architecture, e.g. resnet50")
        if self.arch not in names:
            raise ConfigError("arch", f"unknown torchvision classification architecture {self.arch!r}{closest(self.arch, names)}")
        for banned in ("weights", "num_classes", "progress"):
            if banned in self.options:
                raise ConfigError(f"options.{banned}", "set by wmbench (never pretrained; num_classes from the dataset)")
        if self.options.get("aux_logits"):  # training would get a tuple of outputs, and carriers could sit in heads eval never runs
            raise ConfigError("options.aux_logits", "not supported: wmbench trains and detects on the main logits only")

    def build(self, data: DataBundle) -> nn.Module:
        import torchvision

        self.check_task(data)
        options = {**ARCH_DEFAULTS.get(self.arch, {}), **self.options}
        try:
            model = torchvision.models.get_model(self.arch, weights=None, num_classes=data.num_classes, **options)
        except TypeError as exc:  # an option the architecture does not take, or a value of the wrong type
            raise ConfigError("options", f"torchvision {self.arch} refused {self.options}: {type(exc).__name__}: {exc}") from None
        return replace_first_conv(model, data.in_channels)


@MODELS.register("resnet18")
@dataclass(frozen=True)
class ResNet18(TorchvisionClassifier):
    """torchvision ResNet-18 (He et al. 2016), randomly initialised."""

    arch: ClassVar[str] = "resnet18"


@MODELS.register("resnet18_cifar")
@dataclass(frozen=True)
class ResNet18Cifar(Model):
    """ResNet-18 for 32x32 inputs (He et al. 2016, sec. 4.2's CIFAR stem): torchvision's ResNet-18
    with a 3x3 stride-1 first convolution and no max-pool, randomly initialised; the CIFAR ResNet18
    of most CIFAR work (e.g. kuangliu/pytorch-cifar) and of the WaterMAS authors' testbed.

    Stages run at 32, 16, 8 and 4 pixels on CIFAR-10, so every 3x3 tap sees real inputs (torchvision's
    ImageNet stem runs the last stage at 1x1, where 8 of 9 taps only see padding: ``wmbench inspect``).
    Parameter names are torchvision's (``conv1.weight``, ``layer4.1.conv2.weight``...). A CPU training
    step at 32x32 takes about 6.5x as long as ``resnet18``'s (batch 128, one thread)."""

    def build(self, data: DataBundle) -> nn.Module:
        import torchvision

        self.check_task(data)
        model = torchvision.models.resnet18(weights=None, num_classes=data.num_classes)
        model.conv1 = nn.Conv2d(data.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model


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


# Registers cifar_speednet: it lives in its own module, imported with the built-in models (last: it
# imports this module's Model).
importlib.import_module("wmbench.speednet")
