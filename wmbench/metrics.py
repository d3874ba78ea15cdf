"""Task metrics and detection statistics with their p-values under the null (unwatermarked) model."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Iterator, Literal, NamedTuple

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor, nn

from wmbench.api import Detection
from wmbench.data import IGNORE_INDEX, DataBundle
from wmbench.errors import AT_CHANCE_NOTE, NotApplicable
from wmbench.train import batches


def accuracy(model: nn.Module, data: DataBundle, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on the test split."""
    return accuracies_with_tta(model, data, device, "plain", batch_size).plain


class Accuracies(NamedTuple):
    """Top-1 accuracy with and without test-time augmentation (NaN where not measured)."""

    plain: float
    flip: float  # the mean of the logits of each image and its mirror
    flip_translate: float  # airbench's multi-crop: see accuracies_with_tta


TTA = Literal["plain", "flip", "flip_translate"]


@torch.no_grad()
def accuracies_with_tta(model: nn.Module, data: DataBundle, device: torch.device, up_to: TTA = "flip", batch_size: int = 512) -> Accuracies:
    """The accuracies of ``Accuracies`` up to ``up_to``, from one pass over the test split.

    ``flip_translate`` is airbench's multi-crop evaluation (Jordan 2024), re-implemented from its
    description: half the weight on the flip-TTA logits of the image, a quarter each on those of the
    image shifted by one pixel up-left and by one down-right (reflect padding): six forward passes."""
    levels = ("plain", "flip", "flip_translate").index(up_to)
    model.to(device).eval()
    correct = [0, 0, 0]
    for x, y in batches(data.test_x, data.test_y, batch_size, device):
        logits = model(x)
        correct[0] += int((logits.argmax(1) == y).sum())
        if levels >= 1:
            logits = (logits + model(x.flip(-1))) / 2
            correct[1] += int((logits.argmax(1) == y).sum())
        if levels >= 2:
            h, w = x.shape[-2:]
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            shifts = (padded[..., :h, :w], padded[..., 2:, 2:])  # up-left and down-right by one pixel
            shifted = sum((model(v) + model(v.flip(-1))) / 2 for v in shifts) / 2
            correct[2] += int((((logits + shifted) / 2).argmax(1) == y).sum())
    n = len(data.test_y)
    return Accuracies(*(c / n if i <= levels else float("nan") for i, c in enumerate(correct)))


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


@contextmanager
def nonfinite_outputs(model: nn.Module) -> Iterator[list[int]]:
    """While open, counts ``[inputs whose output holds a NaN or infinity, inputs seen]`` over the
    forward passes of ``model`` (a forward hook on the module itself: the metric's own pass is
    counted, at no extra cost). A task metric takes the argmax of such an output as a prediction,
    so a model whose activations overflow still gets an error figure; ``nonfinite_outputs_note``
    says so beside it."""
    counts = [0, 0]

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() >= 1 and output.is_floating_point():
            counts[0] += int((~torch.isfinite(output.detach().reshape(output.shape[0], -1)).all(dim=1)).sum())
            counts[1] += output.shape[0]

    handle = model.register_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def nonfinite_outputs_note(counts: list[int], metric: str) -> str | None:
    """What ``detect_note`` says of ``nonfinite_outputs``'s counts: None where every output was finite."""
    bad, seen = counts
    if not bad:
        return None
    return f"the model's outputs are non-finite (NaN or infinite) on {bad} of {seen} test inputs: its {metric} counts their argmax as predictions"


def error_from_metric(value: float) -> float:
    """The paper's complementary metric: 100 x (1 - metric)."""
    return 100.0 * (1.0 - value)


# The one-sided level of ``at_chance``'s binomial test.
AT_CHANCE_LEVEL = 1e-3


def chance_accuracy(data: DataBundle) -> float:
    """The top-1 accuracy of a classifier that learned nothing: that of always predicting the test
    split's most common class, at least 1 / num_classes (exactly that on a balanced split)."""
    counts = torch.bincount(data.test_y.flatten().long().clamp_min(0))
    return max(1.0 / data.num_classes, float(counts.max()) / data.test_y.numel())


def at_chance(accuracy: float, data: DataBundle) -> float | None:
    """The chance accuracy (``chance_accuracy``) when ``accuracy``, a model's clean top-1 accuracy
    on ``data``'s test split, is not significantly above it; else None, and always None outside
    classification (segmentation's mIoU has no chance level here) or without a test split.

    The rule: with n test images, k = round(accuracy x n) of them right and p0 the chance accuracy,
    the model is at chance when the one-sided exact binomial test does not reject "its accuracy is
    at most p0" at level ``AT_CHANCE_LEVEL`` (1e-3): P[Binomial(n, p0) >= k] > 1e-3. With p0 = 0.1
    that flags accuracies up to about 15.6% on 360 test images (digits), 11% on 10,000 (CIFAR-10)."""
    n = data.test_y.numel()
    if data.task != "classification" or n == 0 or not math.isfinite(accuracy):
        return None
    chance = chance_accuracy(data)
    k = round(accuracy * n)
    return chance if float(stats.binom.sf(k - 1, n, chance)) > AT_CHANCE_LEVEL else None


def at_chance_note(accuracy: float, data: DataBundle) -> str | None:
    """What a row's ``detect_note`` says of a clean model at chance (``at_chance``), or None."""
    chance = at_chance(accuracy, data)
    if chance is None:
        return None
    return (f"{AT_CHANCE_NOTE} ({100 * accuracy:.1f}% vs chance {100 * chance:.1f}%): "
            "its attack and detection rows do not measure a watermark's cost")


LN10 = math.log(10.0)
# Below this a p-value is computed from its log (float64 tails lose precision, then underflow to 0).
_DIRECT_P = 1e-250


def pearson_detection(extracted: Tensor, reference: Tensor) -> Detection:
    """Pearson r between recovered and inserted marks; one-sided p-value from Student's t (N-2 dof),
    with its log10 finite even where the p-value underflows (``pearson_log10_sf``)."""
    a = extracted.detach().double().flatten().cpu()
    b = reference.detach().double().flatten().cpu()
    n = a.numel()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    if not math.isfinite(denom) or denom == 0.0 or not torch.isfinite(a).all():
        return Detection(stat=0.0, pvalue=1.0, log10_pvalue=0.0)
    r = max(-1.0, min(1.0, float(a @ b) / denom))
    # 1 - r^2 as the squared residual of unit a regressed on unit b: accurate when r is close to 1.
    unit_a, unit_b = a / a.norm(), b / b.norm()
    one_minus_r2 = float((unit_a - (unit_a @ unit_b) * unit_b).square().sum())
    log10_p = pearson_log10_sf(r, n, one_minus_r2)
    if r >= 1.0 or n < 3:  # the p-value of the log (0 where it underflows), so the two never disagree
        return Detection(stat=r, pvalue=10.0**log10_p, log10_pvalue=log10_p)
    t = r * math.sqrt((n - 2) / max(one_minus_r2, sys.float_info.min))  # the same 1 - r^2 as the log's
    return Detection(stat=r, pvalue=float(stats.t.sf(t, n - 2)), log10_pvalue=log10_p)


def pearson_log10_sf(r: float, n: int, one_minus_r2: float | None = None) -> float:
    """log10 P[R >= r] for the Pearson r of ``n`` independent normal pairs (Student's t, n-2 dof),
    finite for every r: in the far tail from the incomplete beta's series,
    P = 0.5 * I_x(nu/2, 1/2) with x = 1 - r^2, whose log does not underflow. ``one_minus_r2`` may
    give 1 - r^2 more precisely than r does; it is floored at the smallest normal double."""
    nu = n - 2
    if nu < 1:
        return 0.0
    x = 1.0 - r * r if one_minus_r2 is None else one_minus_r2
    x = min(max(x, sys.float_info.min), 1.0)
    if r < 1.0:
        p = float(stats.t.sf(r * math.sqrt(nu / x), nu))
        if r <= 0 or p > _DIRECT_P:
            return math.log10(p)
    a, b = nu / 2.0, 0.5
    # I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 2F1(a + b, 1; a + 1; x)
    log_i = a * math.log(x) + b * math.log1p(-x) - math.log(a) - special.betaln(a, b)
    log_i += math.log(special.hyp2f1(a + b, 1.0, a + 1.0, x))
    return (math.log(0.5) + log_i) / LN10


# A null whose standard deviation is at most this fraction of its largest |reading| has collapsed:
# its readings agree to 9 significant digits, so what spread remains is arithmetic residue, not
# variation between candidates (see ``z_detection``).
Z_NULL_RELATIVE_SPREAD = 1e-9


def z_detection(own: float, null: Tensor) -> Detection:
    """How many null standard deviations ``own`` lies above the mean of ``null`` (one draw each of
    n unrelated candidates), with the p-value of a new draw from that normal population: the
    predictive tail P[T >= z / sqrt(1 + 1/n)] of Student's t with n - 1 dof, which accounts for
    the mean and the standard deviation being estimated from n draws (a normal tail
    1 - Phi(z) is too small: at n = 200 by 2.3x at z = 5 and 2e4x at z = 10).

    A collapsed null supports no z test: NotApplicable (the row then has no verdict and says why)
    when the null's standard deviation is at most ``Z_NULL_RELATIVE_SPREAD`` (1e-9) times the
    largest |reading|, own included (a null collapsed to 0 +- rounding against an own reading of 1).
    Such readings agree to 9 significant digits: the candidates read the same value (e.g. after
    1-bit quantization nearly every weight holds one level, and HufuNet's null encoders all
    reconstruct alike), and the spread left is float rounding and saturated tanh/sigmoid tails,
    1e-13..1e-11 of the readings, at which any own reading differing in the 11th digit scored z = 11
    and one differing in the 2nd digit z = 7e9. 1e-9 lies far above float64 rounding (2.2e-16 per
    operation, accumulated over sums of a few hundred terms) and below float32's resolution of the
    weights the readings come from (1.2e-7); healthy nulls spread by 1e-2..1e-1 of their magnitude
    (HufuNet, small_cnn and CIFAR models), and a null partly collapsed but still made of distinct
    readings (3.7e-6 after 2-bit quantization) keeps its z test. Until 2026-12-05 the std was only
    floored at an absolute 1e-12, and such nulls gave z scores of rounding, detected. (NaN readings are not judged here.)"""
    null = null.detach().double().flatten().cpu()
    n = null.numel()
    if n < 3:
        raise ValueError(f"a z score needs at least 3 null draws, got {n}")
    spread, scale = float(null.std()), max(float(null.abs().max()), abs(own))  # own included: a null collapsed near 0
    if spread <= Z_NULL_RELATIVE_SPREAD * scale:
        distinct = int(torch.unique(null).numel())
        raise NotApplicable(
            f"the null readings collapsed: {distinct} distinct values of {n}, their std {spread:.3g} at most "
            f"{Z_NULL_RELATIVE_SPREAD:g} x the largest magnitude compared, {scale:.6g} (float rounding); no z test"
        )
    z = (own - float(null.mean())) / spread
    return Detection(z, *z_score_pvalue(z, n))


def z_score_pvalue(z: float, n: int) -> tuple[float, float]:
    """(p, log10 p) of a z score against ``n`` null draws (``z_detection``), the log finite at any z."""
    t, nu = max(-1e150, min(1e150, z / math.sqrt(1.0 + 1.0 / n))), n - 1  # t * t stays finite; p of -inf is 1
    log10_p = student_t_log10_sf(t, nu)
    return (float(stats.t.sf(t, nu)) if log10_p > math.log10(_DIRECT_P) else float(10.0**log10_p)), float(log10_p)


def student_t_log10_sf(t: float, nu: int) -> float:
    """log10 P[T >= t] for Student's t with ``nu`` dof, finite for every t: the Pearson tail of
    r = t / sqrt(nu + t^2) over nu + 2 pairs (the same t), with 1 - r^2 = nu / (nu + t^2)."""
    return pearson_log10_sf(t / math.sqrt(nu + t * t), nu + 2, nu / (nu + t * t))


def bit_detection(decoded: Tensor, bits: Tensor) -> Detection:
    """Bit accuracy; p-value P[Binomial(T, 1/2) >= matches], its log10 summed from log terms.
    A ValueError when the key's bits are not 0/1 or not one per decoded bit (a one-bit key would
    broadcast against every decoded bit and count each as a trial of one)."""
    decoded, bits = decoded.flatten().cpu(), bits.flatten().cpu()
    if decoded.numel() != bits.numel() or bits.numel() == 0:
        raise ValueError(f"the key holds {bits.numel()} bits, the model yields {decoded.numel()}")
    if not ((bits == 0) | (bits == 1)).all():
        raise ValueError("the key's bits are not all 0 or 1")
    matches = int((decoded.bool() == bits.bool()).sum())
    total = bits.numel()
    return Detection(
        stat=matches / total,
        pvalue=float(stats.binom.sf(matches - 1, total, 0.5)),
        log10_pvalue=binomial_log10_sf(matches, total),
    )


def binomial_log10_sf(matches: int, total: int) -> float:
    """log10 P[Binomial(total, 1/2) >= matches], finite for every count (a log-sum of the pmf)."""
    if matches <= 0:
        return 0.0
    k = np.arange(matches, total + 1)
    return min(0.0, float(special.logsumexp(stats.binom.logpmf(k, total, 0.5))) / LN10)
