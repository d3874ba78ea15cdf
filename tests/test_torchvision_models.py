"""Any torchvision classifier by name, and attacks that cannot apply to it give a row saying why."""

from __future__ import annotations

import logging
import textwrap

import pandas as pd
import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.cli import main
from wmbench.errors import ConfigError, NotApplicable
from wmbench.registry import ATTACKS, MODELS
from wmbench.scenario import load_scenario


@pytest.mark.parametrize("arch", ["shufflenet_v2_x0_5", "regnet_x_400mf", "mnasnet0_5"])
def test_any_torchvision_arch_fits_the_data(digits, arch):
    model = MODELS.build("torchvision", {"arch": arch}).build(digits)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1  # digits are grayscale: the first conv was replaced
    assert model.eval()(digits.test_x[:3]).shape == (3, digits.num_classes)


def test_builder_options_pass_through(digits):
    model = MODELS.build("torchvision", {"arch": "efficientnet_b0", "options": {"dropout": 0.0}}).build(digits)
    assert model.classifier[0].p == 0.0


def test_unknown_arch_names_the_field_and_close_names(tmp_path):
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""
        name: x
        datasets: [digits]
        models: [small_cnn, {name: torchvision, args: {arch: shufflenet_v2}}]
        methods: [none]
    """))
    with pytest.raises(ConfigError, match=r"models\[1\]\.args\.arch: unknown torchvision .*did you mean: shufflenet_v2_x"):
        load_scenario(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match=r"models\[0\]\.args\.arch: required"):
        MODELS.build("torchvision", {}, "models[0]")
    with pytest.raises(ConfigError, match=r"options\.weights: set by wmbench"):
        MODELS.build("torchvision", {"arch": "resnet18", "options": {"weights": "DEFAULT"}})


def test_list_models_says_any_torchvision_arch(capsys):
    assert main(["list", "models"]) == 0
    assert "Any torchvision classification architecture by name" in capsys.readouterr().out


def _prune(model, args, data):
    ctx = AttackContext(data, torch.Generator().manual_seed(0), torch.device("cpu"))
    return ATTACKS.build("prune", args).apply(model.eval(), 0.5, ctx), ctx


def test_structured_pruning_that_cannot_apply_is_not_applicable(digits, caplog):
    shuffle = MODELS.build("torchvision", {"arch": "shufflenet_v2_x0_5"}).build(digits)
    with pytest.raises(NotApplicable, match="cannot trace ShuffleNetV2"):
        _prune(shuffle, {"mode": "structured"}, digits)
    regnet = MODELS.build("torchvision", {"arch": "regnet_x_400mf"}).build(digits)
    with pytest.raises(NotApplicable, match="cannot remove channels of RegNet"):
        _prune(regnet, {"mode": "structured", "remove": True}, digits)
    # zeroing still works on RegNet; its grouped-conv warning is said once, not per group or cell
    with caplog.at_level(logging.WARNING, logger="wmbench"):
        for _ in range(2):
            _, ctx = _prune(regnet, {"mode": "structured"}, digits)
            assert ctx.effect > 0.1
    grouped = [r for r in caplog.records if "grouped" in r.getMessage()]
    assert len(grouped) <= 1


@pytest.mark.at_chance("plumbing: every quickstart attack runs (or is not applicable) on ShuffleNet")
def test_held_out_arch_runs_the_quickstart_attacks_end_to_end(tmp_path, capsys):
    """shufflenet_v2_x0_5 (never registered by name) under every quickstart attack, from a scenario
    file; the attacks built on torch-pruning's graph (structured pruning, permute, dummy_neurons and
    the chain holding permute), which cannot trace it, give rows with a note."""
    quickstart = load_scenario("scenarios/quickstart.yaml")
    attacks = "\n".join(
        f"  - {{name: {s.attack.name}, label: {s.label}, args: {dict(_args(s.attack))}, strengths: [{s.strengths[1]:g}]}}"
        for s in quickstart.attacks
    )
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""
        name: heldout
        seeds: [0]
        device: cpu
        datasets: [{name: digits, args: {subset_train: 100, subset_test: 50}}]
        models: [{name: torchvision, label: shufflenet, args: {arch: shufflenet_v2_x0_5}}]
        methods: [{name: watermas, args: {n_carriers: 64}}]
        training: {epochs: 1, batch_size: 50}
        attacks:
    """) + attacks + "\n")
    args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "lb" / "heldout.csv")
    assert set(frame["attack"]) == {s.label for s in quickstart.attacks} and frame["failure"].isna().all()
    traced = {"prune-structured", "permute", "dummy_neurons", "permute+scale-negate"}
    structured = frame[frame.attack.isin(traced) & (frame.strength > 0)]
    assert set(structured["attack"]) == traced
    assert structured["detect_stat"].isna().all() and structured["error"].isna().all()
    assert structured["detect_note"].str.contains("attack not applicable: torch-pruning cannot trace ShuffleNetV2").all()
    others = frame[~frame.attack.isin(traced) | (frame.strength == 0)]
    assert others["detect_stat"].notna().all() and others["error"].notna().all()


def _args(attack):
    import dataclasses

    return {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack) if getattr(attack, f.name) != f.default}
