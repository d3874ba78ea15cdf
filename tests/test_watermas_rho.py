"""WaterMAS's rho is scale-free: the MAS step moves each carrier by rho * sigma_bar (root mean square),
whatever the carrier count and whatever the scale of the weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wmbench.data import DataBundle
from wmbench.image_mark import CarrierSet
from wmbench.registry import METHODS, MODELS


def data() -> DataBundle:
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 4
    return DataBundle("synthetic", x, y, x, y, 4)


def perturbation_rms(n_carriers: int, rho: float, weight_scale: float = 1.0) -> tuple[float, float]:
    """(root-mean-square carrier move of MAS's perturbed pass, sigma_bar) for a fresh small_cnn whose
    weights are multiplied by ``weight_scale`` before the key is drawn."""
    bundle = data()
    torch.manual_seed(0)
    model = MODELS.build("small_cnn", {"width": 8, "hidden": 16}).build(bundle)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    method = METHODS.build("watermas", {"n_carriers": n_carriers, "rho": rho})
    key = method.keygen(model, bundle, torch.Generator().manual_seed(1))
    carriers = CarrierSet.bind(model, key)
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(carriers.read(n_carriers)))
    step = method.step_fn(model, key)
    step(model, (bundle.train_x[:16], bundle.train_y[:16]), nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0))
    hook.remove()
    assert len(seen) == 2  # the plain pass, then the perturbed one
    move = seen[1] - seen[0]
    return float(move.norm() / math.sqrt(n_carriers)), float(key.tensors["sigma"].mean())


@pytest.mark.parametrize("n_carriers", [64, 1024])
def test_each_carrier_moves_rho_sigma_bar_whatever_the_count(n_carriers):
    rms, sigma_bar = perturbation_rms(n_carriers, rho=0.5)
    assert rms == pytest.approx(0.5 * sigma_bar, rel=1e-4)


def test_rescaling_the_weights_rescales_the_step():
    rms, sigma_bar = perturbation_rms(256, rho=0.5)
    rms_big, sigma_big = perturbation_rms(256, rho=0.5, weight_scale=10.0)
    assert sigma_big == pytest.approx(10 * sigma_bar, rel=1e-4)
    assert rms_big / sigma_big == pytest.approx(rms / sigma_bar, rel=1e-4)
    assert rms_big == pytest.approx(10 * rms, rel=1e-3)
