"""WaterMAS keeps its promises: frozen carriers, perfect recovery, a sharp landscape at the carriers."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from wmbench.api import Key
from wmbench.image_mark import CarrierSet, extract_pixels, load_image, sample_positions
from wmbench.metrics import pearson_detection
from wmbench.registry import METHODS
from wmbench.sharpness import loss_rise

from conftest import train_small


def carrier_values(model: nn.Module, key: Key) -> torch.Tensor:
    return CarrierSet.bind(model, key).read(len(key.tensors["flat_idx"]))


def test_carriers_bit_identical_after_training_with_momentum_and_weight_decay(watermas_model):
    model, key = watermas_model
    assert torch.equal(carrier_values(model, key), key.tensors["values"])


def test_carriers_hold_the_image_through_eq5(watermas_model):
    model, key = watermas_model
    recovered = extract_pixels(model, key)
    assert torch.allclose(recovered, key.tensors["pixels"], atol=1e-3)


def test_detection_without_attack_is_perfect(watermas_model):
    model, key = watermas_model
    result = METHODS.build("watermas").detect(model, key)
    assert result.stat == pytest.approx(1.0, abs=1e-9)
    assert result.pvalue < 1e-12 and result.detected(1e-6)


def test_unwatermarked_model_is_not_detected(none_model, watermas_model):
    model, key = none_model
    result = METHODS.build("none").detect(model, key)
    assert abs(result.stat) < 0.15 and result.pvalue > 1e-3
    # the same key drawn for WaterMAS (same seed) on the unwatermarked model: not detected either
    _, wm_key = watermas_model
    assert torch.equal(wm_key.tensors["flat_idx"], key.tensors["flat_idx"])
    assert METHODS.build("watermas").detect(model, wm_key).pvalue > 1e-3


def test_trained_watermas_is_accurate(watermas_model, digits):
    from wmbench.metrics import accuracy

    assert accuracy(watermas_model[0], digits, torch.device("cpu")) > 0.85


def reference_mas_update(model: nn.Module, batch, carriers: dict[str, torch.Tensor], rho: float, lam: float, lr: float) -> dict[str, torch.Tensor]:
    """Plain two-pass MAS with functional calls and autograd.grad, followed by a plain SGD step."""
    x, y = batch
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss()

    def grads(at: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in at.items()}
        loss = loss_fn(torch.func.functional_call(model, leaves, (x,)), y)
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    g1 = grads(params)
    g1_w = torch.cat([g1[n].flatten()[idx] for n, idx in carriers.items()])
    perturbed = {n: t.clone() for n, t in params.items()}
    for n, idx in carriers.items():
        perturbed[n].view(-1)[idx] -= rho * g1[n].flatten()[idx] / g1_w.norm()
    g2 = grads(perturbed)
    updated = {}
    for n, t in params.items():
        d = g1[n] - lam * g2[n]
        if n in carriers:
            d.view(-1)[carriers[n]] = 0.0
        updated[n] = t - lr * d
    return updated


@pytest.mark.parametrize("lam", [0.4, 0.0], ids=["mas", "lam0-one-pass"])
def test_mas_step_equals_two_pass_reference(lam: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    batch = (torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
    method = METHODS.build("watermas", {"n_carriers": 10, "rho": 0.2, "lam": lam})
    from wmbench.data import DataBundle
    from wmbench.methods.watermas import perturbation_radius

    data = DataBundle("t", torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 3)
    key = method.keygen(model, data, torch.Generator().manual_seed(0))
    carriers = method.carriers(key)
    radius = perturbation_radius(0.2, key)  # rho is scale-free: the radius is rho * sigma_bar * sqrt(N)
    expected = reference_mas_update(model, batch, carriers, rho=radius, lam=lam, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    method.training_step(model, batch, nn.CrossEntropyLoss(), optimizer, key)
    assert len(forwards) == (2 if lam else 1)  # lam 0: the perturbed pass is skipped, not wasted
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-10, atol=1e-12)


def test_mas_buys_sharpness_at_the_carriers(watermas_model, none_model, digits):
    wm_model, wm_key = watermas_model
    none, none_key = none_model
    assert torch.equal(wm_key.tensors["flat_idx"], none_key.tensors["flat_idx"])
    assert loss_rise(wm_model, wm_key, digits, 0.5) > 2 * loss_rise(none, none_key, digits, 0.5)


def test_sample_positions_are_distinct_and_in_range():
    sizes = [5, 100, 20]
    pid, idx = sample_positions(sizes, 100, torch.Generator().manual_seed(3))
    flat = torch.tensor([0, 5, 105])[pid] + idx
    assert len(set(flat.tolist())) == 100
    assert all(0 <= i < sizes[p] for p, i in zip(pid.tolist(), idx.tolist()))


def test_any_image_is_resized_to_the_carrier_count(tmp_path):
    from PIL import Image

    path = tmp_path / "logo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    assert load_image(str(path), 1000).shape == (1000,)
    assert load_image(None, 37).shape == (37,)


def test_key_round_trips_with_private_permissions(watermas_model, tmp_path):
    _, key = watermas_model
    key.save(tmp_path / "key.safetensors")
    assert (tmp_path / "key.safetensors").stat().st_mode & 0o777 == 0o600
    loaded = Key.load(tmp_path / "key.safetensors")
    assert loaded.method == "watermas" and loaded.meta == key.meta
    assert all(torch.equal(loaded.tensors[k], v) for k, v in key.tensors.items())


def test_pearson_pvalue_matches_null_distribution():
    g = torch.Generator().manual_seed(0)
    pvalues = torch.tensor([pearson_detection(torch.randn(500, generator=g), torch.randn(500, generator=g)).pvalue for _ in range(400)])
    assert 0.4 < float(pvalues.mean()) < 0.6  # uniform under the null
    assert float((pvalues < 0.05).float().mean()) < 0.1


def test_alignment_never_reads_one_d_carriers_back_from_the_key(digits):
    """Carriers in 1-D tensors (biases, BatchNorm) are read as they are under alignment: there the
    'channel' is the carrier itself, and a norm ratio would hand back the recorded value."""
    model, key = train_small(digits, "watermas", epochs=1, carriers_scope="all", n_carriers=6000)
    one_d = torch.tensor([len(key.meta["shapes"][pid]) == 1 for pid in key.tensors["param_id"].tolist()])
    assert int(one_d.sum()) >= 30
    key = Key(key.method, {name: t[one_d] for name, t in key.tensors.items()}, key.meta)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # magnitudes change, signs stay: a norm ratio would restore the recorded values
    torch.testing.assert_close(extract_pixels(model, key, align=True), extract_pixels(model, key, align=False))


def test_mas_every_k_runs_the_perturbed_pass_on_every_kth_step_and_keeps_carriers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    from wmbench.data import DataBundle

    data = DataBundle("t", torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), 3)
    method = METHODS.build("watermas", {"n_carriers": 10, "mas_every": 3})
    key = method.keygen(model, data, torch.Generator().manual_seed(0))
    step = method.step_fn(model, key)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    per_step = []
    for _ in range(7):
        before = len(forwards)
        step(model, (torch.randn(16, 6), torch.randint(0, 3, (16,))), nn.CrossEntropyLoss(), optimizer)
        per_step.append(len(forwards) - before)
    assert per_step == [2, 1, 1, 2, 1, 1, 2]  # steps 0, 3, 6 are MAS steps
    assert torch.equal(carrier_values(model, key), key.tensors["values"])


def test_an_added_field_at_its_default_keeps_the_cell_ids():
    from wmbench.api import component_config

    default = component_config(METHODS.build("watermas"))
    assert "mas_every" not in default["args"]  # stored WaterMAS trainings keep their ids
    assert component_config(METHODS.build("watermas", {"mas_every": 4}))["args"]["mas_every"] == 4
