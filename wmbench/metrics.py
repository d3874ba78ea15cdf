"""Task metrics and detection statistics with their p-values under the null (unwatermarked) model."""

from __future__ import annotations

import math

import torch
from scipy import stats
from torch import Tensor, nn

from wmbench.api import Detection
from wmbench.data import IGNORE_INDEX, DataBundle
from wmbench.train import batches


@torch.no_grad()
def accuracy(model: nn.Module, data: DataBundle, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on the test split."""
    model.to(device).eval()
    correct = 0
    for x, y in batches(data.test_x, data.test_y, batch_size, device):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data.test_y)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = target class, columns = predicted class, over
    the pixels whose target is not ``ignore_index`` (targets outside [0, num_classes) are ignored too)."""
    t, p = target.flatten(), pred.flatten()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    codes = t[keep].long() * num_classes + p[keep].long().clamp(0, num_classes - 1)
    return torch.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def miou_from_confusion(confusion: Tensor) -> float:
    """Mean IoU over the classes *present*: those with a non-zero union (target or prediction
    pixels, outside ignored pixels). IoU_c = TP_c / (TP_c + FP_c + FN_c). A class that neither
    occurs nor is predicted is left out of the mean instead of counting as 0 or 1; with no
    counted pixel at all the result is 0."""
    c = confusion.double()
    tp = c.diagonal()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    if not bool(present.any()):
        return 0.0
    return float((tp[present] / union[present]).mean())


@torch.no_grad()
def miou(model: nn.Module, data: DataBundle, device: torch.device, batch_size: int = 16) -> float:
    """Mean intersection over union on the test split, from one confusion matrix accumulated over
    all test pixels (label 255 ignored); see ``miou_from_confusion`` for the classes averaged."""
    model.to(device).eval()
    k = data.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for x, y in batches(data.test_x, data.test_y, batch_size, device):
        confusion += confusion_matrix(model(x).argmax(1), y, k)
    return miou_from_confusion(confusion)


TASK_METRICS = {"classification": ("accuracy", accuracy), "segmentation": ("miou", miou)}


def task_metric(model: nn.Module, data: DataBundle, device: torch.device) -> tuple[str, float]:
    """The task's metric name and value on the test split: ("accuracy", top-1 accuracy) for
    classification, ("miou", mean IoU) for segmentation. Both lie in [0, 1], higher is better, so
    ``error_from_metric`` applies to either."""
    if data.task not in TASK_METRICS:
        raise ValueError(f"no metric for task {data.task!r} (known: {', '.join(TASK_METRICS)})")
    name, fn = TASK_METRICS[data.task]
    return name, fn(model, data, device)


def error_from_metric(value: float) -> float:
    """The paper's complementary metric: 100 x (1 - metric)."""
    return 100.0 * (1.0 - value)


def pearson_detection(extracted: Tensor, reference: Tensor) -> Detection:
    """Pearson r between recovered and inserted marks; one-sided p-value from Student's t (N-2 dof)."""
    a = extracted.detach().double().flatten().cpu()
    b = reference.detach().double().flatten().cpu()
    n = a.numel()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    if not math.isfinite(denom) or denom == 0.0 or not torch.isfinite(a).all():
        return Detection(stat=0.0, pvalue=1.0)
    r = max(-1.0, min(1.0, float(a @ b) / denom))
    if r >= 1.0:
        return Detection(stat=r, pvalue=0.0)
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return Detection(stat=r, pvalue=float(stats.t.sf(t, n - 2)))


def bit_detection(decoded: Tensor, bits: Tensor) -> Detection:
    """Bit accuracy; p-value P[Binomial(T, 1/2) >= matches]."""
    matches = int((decoded.flatten().cpu().bool() == bits.flatten().cpu().bool()).sum())
    total = bits.numel()
    return Detection(stat=matches / total, pvalue=float(stats.binom.sf(matches - 1, total, 0.5)))
