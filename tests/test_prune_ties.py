"""Unstructured pruning zeroes, among weights of equal magnitude at the cut, the lowest indices
(``attacks.pruning.zero_smallest``): the zeros are those of numpy's stable argsort, whatever the
split of the weights into tensors, so a prune row does not depend on ``torch.topk``'s choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.attacks.pruning import zero_smallest
from wmbench.models import weight_params
from wmbench.registry import ATTACKS


def reference_zeros(values: np.ndarray, fraction: float) -> np.ndarray:
    """The mask of the first round(fraction * n) entries of a stable ascending sort of |values|."""
    flat = np.abs(values.ravel())
    drop = np.zeros(flat.size, dtype=bool)
    drop[np.argsort(flat, kind="stable")[: round(fraction * flat.size)]] = True
    return drop


def tied_values(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n weights of few magnitudes (carriers written with equal magnitudes, zeros), random signs."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=dtype)
    signs = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
    return levels[torch.randint(0, len(levels), (n,), generator=g)] * signs


def zeros_after(chunks: list[torch.Tensor], fraction: float) -> np.ndarray:
    params = [nn.Parameter(c.clone()) for c in chunks]
    zero_smallest(params, fraction)
    return torch.cat([p.detach().flatten() == 0 for p in params]).numpy()


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_ties_at_the_cut_are_zeroed_lowest_index_first(fraction, seed):
    values = tied_values(5000, seed)
    drop = reference_zeros(values.numpy(), fraction)
    zeros = zeros_after([values.view(50, 100)], fraction)
    assert np.array_equal(zeros, drop | (values.numpy() == 0))
    assert zeros[~drop].sum() == (values.numpy()[~drop] == 0).sum()  # only zeros already there beyond the cut


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_the_same_zeros_for_any_split_into_tensors(fraction):
    values = tied_values(6000, 2)
    whole = zeros_after([values], fraction)
    splits = [
        [values[:1000].view(10, 100), values[1000:1005], values[1005:].view(-1, 5, 1)],
        [values[i : i + 7] for i in range(0, 6000, 7)],
    ]
    for chunks in splits:
        assert np.array_equal(zeros_after(chunks, fraction), whole)
    assert np.array_equal(whole, reference_zeros(values.numpy(), fraction) | (values.numpy() == 0))


def test_nan_counts_as_the_largest_magnitude():
    values = tied_values(1000, 3)
    values[::7] = float("nan")
    for fraction in (0.5, 0.9, 1.0):
        params = [nn.Parameter(values.clone())]
        zero_smallest(params, fraction)
        p = params[0].detach().numpy()
        drop = reference_zeros(values.numpy(), fraction)  # numpy's sort puts NaN last
        assert np.array_equal(p == 0, drop | (values.numpy() == 0))
        assert np.array_equal(np.isnan(p), np.isnan(values.numpy()) & ~drop)


def test_double_precision_magnitudes_are_not_rounded_to_single():
    values = 1.0 + torch.arange(1000, dtype=torch.float64).flip(0) * 1e-12  # equal in float32
    assert torch.unique(values.float()).numel() == 1
    zeros = zeros_after([values], 0.3)
    assert np.array_equal(zeros, reference_zeros(values.numpy(), 0.3))  # the last 300: the smallest


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_attack_zeroes_the_documented_weights(scope, digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():
        for i, p in enumerate(weight_params(model).values()):
            p.copy_(tied_values(p.numel(), 10 + i).view_as(p))
    before = [p.detach().numpy().ravel().copy() for p in weight_params(model).values()]
    ctx = AttackContext(data=digits, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    attacked = ATTACKS.build("prune", {"scope": scope}).apply(model, 0.6, ctx)
    after = np.concatenate([p.detach().numpy().ravel() == 0 for p in weight_params(attacked).values()])
    if scope == "global":
        expected = reference_zeros(np.concatenate(before), 0.6)
    else:
        expected = np.concatenate([reference_zeros(b, 0.6) for b in before])
    assert np.array_equal(after, expected | (np.concatenate(before) == 0))


def test_global_pruning_of_a_model_without_conv_or_linear_weights_zeroes_nothing_as_per_layer_does(digits):
    """``scope: global`` concatenated an empty list (``torch.cat(): expected a non-empty list of
    Tensors``, the cell failed) where ``scope: layer`` of the same model zeroes nothing, effect 0."""

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) @ self.w

    zero_smallest([], 0.5)
    for scope in ("layer", "global"):
        ctx = AttackContext(data=digits, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        model = Bare()
        attacked = ATTACKS.build("prune", {"scope": scope}).apply(model, 0.5, ctx)
        assert ctx.effect == 0.0 and torch.equal(attacked.w, model.w), scope
