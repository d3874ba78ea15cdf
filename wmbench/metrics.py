"""Task metrics and detection statistics with their p-values under the null (unwatermarked) model."""

from __future__ import annotations

import math

import torch
from scipy import stats
from torch import Tensor, nn

from wmbench.api import Detection
from wmbench.data import DataBundle
from wmbench.train import batches


@torch.no_grad()
def accuracy(model: nn.Module, data: DataBundle, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on the test split."""
    model.to(device).eval()
    correct = 0
    for x, y in batches(data.test_x, data.test_y, batch_size, device):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data.test_y)


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
