"""A method that cannot work with one model of a grid (deepsigns needs a Linear classifier) fails
that pair's cells, with the scenario field in the reason, and the rest of the grid runs; with one
model on one dataset the scenario itself is wrong: one line, exit 2, nothing written."""

from __future__ import annotations

import re
import textwrap

import pandas as pd
import pytest

from wmbench.cli import EXIT_CELLS_FAILED, main

PLUGIN = '''
from dataclasses import dataclass

from torch import nn

from wmbench.models import Model
from wmbench.registry import MODELS


@MODELS.register("conv_head_{tag}")
@dataclass(frozen=True)
class ConvHead(Model):
    """Convolutions straight to the class scores: no Linear layer at all."""

    def build(self, data):
        return nn.Sequential(
            nn.Conv2d(data.in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, data.num_classes, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
'''

SCENARIO = """
name: pairs
seeds: [0]
device: cpu
plugins: [convhead.py]
datasets: [{{name: digits, args: {{subset_train: 200, subset_test: 100}}}}]
models: [{models}]
methods: [none, deepsigns]
training: {{epochs: 1, batch_size: 100}}
attacks: [{{name: noise, strengths: [1.0]}}]
"""


def write(tmp_path, tag, models):
    (tmp_path / "convhead.py").write_text(PLUGIN.format(tag=tag))
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SCENARIO.format(models=models)))
    return ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]


@pytest.mark.at_chance("plumbing: incompatible pairs fail their cells, the rest runs")
def test_an_incompatible_pair_fails_its_cells_and_the_grid_goes_on(tmp_path, capsys):
    args = write(tmp_path, "a", "{name: small_cnn, args: {width: 8, hidden: 16}}, conv_head_a")
    assert main(args) == EXIT_CELLS_FAILED
    frame = pd.read_csv(tmp_path / "lb" / "pairs.csv")
    assert len(frame) == 8  # 2 models x 2 methods x noise 0, 1
    failed = frame[frame["failure"].notna()]
    assert set(zip(failed["model"], failed["method"])) == {("conv_head_a", "deepsigns")}
    assert failed["failure"].str.contains(r"training: Incompatible: .*s\.yaml: methods\[1\]: deepsigns needs a Linear").all()
    ran = frame[frame["failure"].isna()]
    assert len(ran) == 6 and ran["error"].notna().all() and ran["detect_stat"].notna().all()
    assert "small_cnn/digits/deepsigns" not in capsys.readouterr().err
    # the leaderboard says so: no seed, no verdict, nothing "removed", and a table of failed cells
    md = (tmp_path / "lb" / "pairs.md").read_text()
    section = md.split("## conv_head_a / digits")[1].split("##")[0]
    deepsigns = next(line for line in section.splitlines() if line.startswith("| deepsigns"))
    assert [c.strip() for c in deepsigns.split("|")[3:8]] == ["0 of 1 (1 failed)", "n/a", "n/a", "n/a", "n/a"]
    failed_table = md.split("## Failed cells")[1]
    assert re.search(r"\| conv_head_a +\| digits +\| deepsigns +\| noise +\| 0 +\| 2 +\| training: Incompatible: ", failed_table)
    assert "Failed cells" in (tmp_path / "lb" / "pairs.html").read_text()


def test_the_same_pair_alone_is_a_wrong_scenario(tmp_path, capsys):
    args = write(tmp_path, "b", "conv_head_b")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "methods[1]: deepsigns needs a Linear classifier" in err
    assert not (tmp_path / "lb").exists()


@pytest.mark.at_chance("plumbing: incompatible pairs fail their cells, the rest runs")
def test_the_null_skips_the_pair_and_measures_the_rest(tmp_path, caplog):
    args = write(tmp_path, "c", "{name: small_cnn, args: {width: 8, hidden: 16}}, conv_head_c")
    args[0] = "null"
    assert main([*args, "--keys", "5"]) == 0
    null = pd.read_csv(tmp_path / "lb" / "pairs_null.csv")
    pairs = set(zip(null["model"], null["method"]))
    assert ("small_cnn", "deepsigns") in pairs and ("conv_head_c", "deepsigns") not in pairs
    assert "deepsigns skipped on conv_head_c/digits" in caplog.text


@pytest.mark.at_chance("plumbing: incompatible pairs fail their cells, the rest runs")
def test_a_model_too_small_for_the_inputs_fails_its_cells_before_any_training(tmp_path, capsys, monkeypatch):
    from wmbench.train import Trainer

    trained = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: trained.append(self.desc) or original_fit(self, *a, **k))
    args = write(tmp_path, "d", "{name: small_cnn, args: {width: 8, hidden: 16}}, {name: torchvision, label: squeeze, args: {arch: squeezenet1_1}}")
    assert main(args) == EXIT_CELLS_FAILED
    frame = pd.read_csv(tmp_path / "lb" / "pairs.csv")
    failed = frame[frame["failure"].notna()]
    assert set(failed["model"]) == {"squeeze"} and len(failed) == 4  # both methods, noise 0 and 1
    assert failed["failure"].str.contains(
        r"training: Incompatible: .*models\[1\]: the model does not run on digits inputs of shape 1x8x8 \(RuntimeError: "
    ).all()
    assert not any("squeeze" in d for d in trained) and len(trained) == 2  # small_cnn's none and deepsigns


@pytest.mark.at_chance("plumbing: incompatible pairs fail their cells, the rest runs")
def test_the_null_skips_a_model_that_cannot_take_the_inputs(tmp_path, caplog):
    args = write(tmp_path, "e", "{name: small_cnn, args: {width: 8, hidden: 16}}, {name: torchvision, label: squeeze, args: {arch: squeezenet1_1}}")
    args[0] = "null"
    assert main([*args, "--keys", "5"]) == 0
    null = pd.read_csv(tmp_path / "lb" / "pairs_null.csv")
    assert set(null["model"]) == {"small_cnn"} and "squeeze/digits skipped" in caplog.text


def test_the_curve_skips_a_model_that_cannot_take_the_inputs(tmp_path, caplog):
    args = write(tmp_path, "f", "{name: small_cnn, args: {width: 8, hidden: 16}}, {name: torchvision, label: squeeze, args: {arch: squeezenet1_1}}")
    args[0] = "curve"
    assert main(args) == 0
    curve = pd.read_csv(tmp_path / "lb" / "pairs_curve.csv")
    assert set(curve["model"]) == {"small_cnn"} and "curve: squeeze/digits skipped" in caplog.text


def test_dry_run_finds_a_method_model_mismatch_and_a_run_stops_before_training(tmp_path, capsys):
    """A method's key that cannot be drawn on the model (a layer the model lacks, more carriers than
    weights) was found only when that training started, after the others had trained and been
    stored; the pre-flight draws every key once first: --dry-run fails, and so does the run, with nothing done."""
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SCENARIO.format(models="{name: small_cnn, args: {width: 8, hidden: 16}}")).replace("plugins: [convhead.py]\n", ""))
    common = ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    for bad in ("{name: uchida, args: {layer: conv9.weight}}", "{name: watermas, args: {n_carriers: 10000000}}"):
        args = ["run", str(tmp_path / "s.yaml"), *common, "--set", f"methods[1]={bad}"]
        assert main([*args, "--dry-run"]) == 2
        assert "methods[1]" in capsys.readouterr().err
        assert main(args) == 2
        assert "methods[1]" in capsys.readouterr().err
        assert not (tmp_path / "c" / "models").exists() or not any((tmp_path / "c" / "models").iterdir())  # nothing trained
        assert not (tmp_path / "lb").exists()


def test_dry_run_lists_the_incompatible_pairs_of_a_larger_grid(tmp_path, capsys):
    args = write(tmp_path, "g", "{name: small_cnn, args: {width: 8, hidden: 16}}, conv_head_g")
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"incompatible, its cells will fail: .*methods\[1\]: deepsigns needs a Linear", out)
    assert out.count("incompatible") == 1


def test_dry_run_downloads_nothing(tmp_path, monkeypatch, capsys):
    """The default cifar10 (torchvision's download) under --dry-run: its pre-flight would fetch
    170 MB; it is left unchecked and says so."""
    import torchvision.datasets

    from wmbench.cli import main

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("downloaded"))
    (tmp_path / "s.yaml").write_text("name: s\nseeds: [0]\ndatasets: [cifar10]\nmodels: [small_cnn]\nmethods: [none]\nattacks: []\n")
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--dry-run"]) == 0
    assert "cifar10: not checked, its data would be downloaded" in capsys.readouterr().out
    assert not (tmp_path / "c" / "datasets").exists() or not any((tmp_path / "c" / "datasets").rglob("*.safetensors"))
