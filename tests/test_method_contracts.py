"""Method contracts found broken by a probe of every method's documented semantics (2026-12-05)."""

from __future__ import annotations

import pytest
import torch
from conftest import plugin_scenario, train_small
from torch import nn

from wmbench.cli import main
from wmbench.errors import ConfigError
from wmbench.registry import METHODS, MODELS


def test_watermas_all_scope_keeps_constant_tensors_out_and_survives_a_tiny_change(digits):
    """BatchNorm weights (all 1) and biases (all 0) had sigma 0 (clamped to 1e-8): the image read as
    pixel noise and 1e-4 of noise on them took r from 0.997 to 0.03."""
    model, key = train_small(digits, "watermas", epochs=2, carriers_scope="all")
    method = METHODS.build("watermas", {"carriers_scope": "all"})
    assert (key.tensors["sigma"] > 1e-6).all()
    batchnorm = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for pn, _ in m.named_parameters(recurse=False)}
    assert batchnorm and not batchnorm & set(key.meta["params"])
    clean = float(method.detect(model, key).stat)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.weight.add_(1e-4 * torch.randn_like(m.weight))
                m.bias.add_(1e-4 * torch.randn_like(m.bias))
    assert clean > 0.99 and float(method.detect(model, key).stat) > 0.99
    assert method.version == "3" and METHODS.build("watermas").version == "2"  # the default scope keeps its trainings


def test_watermas_trains_when_a_carrier_tensor_gets_no_gradient(digits):
    """A frozen layer (or a head the forward never runs): the MAS step met a None gradient."""
    from wmbench.train import Trainer, TrainingConfig

    torch.manual_seed(0)
    model = MODELS.build("small_cnn").build(digits)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first.weight.requires_grad_(False)
    trainer = Trainer(digits, TrainingConfig(epochs=1, lr=0.05), torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    method = METHODS.build("watermas", {"n_carriers": 256})
    key = method.embed(model, trainer, torch.Generator().manual_seed(1))
    assert float(method.detect(model.eval(), key).stat) > 0.99  # carriers, frozen or not, read back


def test_deepsigns_layer_the_model_lacks_stops_before_training(tmp_path, capsys):
    path = plugin_scenario(tmp_path, tmp_path / "none.py", "{name: deepsigns, args: {layer: nope}}", name="dsl").read_text()
    (tmp_path / "dsl.yaml").write_text(path.replace(f"plugins: [{tmp_path / 'none.py'}]", "plugins: []"))
    assert main(["run", str(tmp_path / "dsl.yaml"), "--dry-run", "--cache", str(tmp_path / "c")]) == 2
    assert "methods[0].args.layer: the model has no layer 'nope' to probe" in capsys.readouterr().err


def test_tattooed_refuses_fewer_weights_than_bits(digits):
    model = MODELS.build("small_cnn").build(digits)
    with pytest.raises(ConfigError, match="the codes need at least one weight per bit"):
        METHODS.build("tattooed", {"fraction": 0.0001}).keygen(model, digits, torch.Generator().manual_seed(0))


def test_uchida_default_layer_skips_frozen_layers(digits):
    from wmbench.methods.uchida import default_layer

    model = MODELS.build("small_cnn").build(digits)
    chosen = default_layer(model, 64)
    model.get_submodule(chosen).weight.requires_grad_(False)
    other = default_layer(model, 64)
    assert other != chosen and model.get_submodule(other).weight.requires_grad
