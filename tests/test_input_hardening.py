"""Inputs that used to pass silently or end in a traceback: a key given twice, strengths an attack
would round or overflow on, a training without a step, an attack that overflows the weights, bad
command-line values, and a null run over a store holding rows of an older scenario."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import TINY_SCENARIO
from wmbench.cli import main
from wmbench.errors import ConfigError
from wmbench.registry import DATASETS
from wmbench.scenario import load_scenario, parse_scenario
from wmbench.train import Trainer, TrainingConfig

BASE = {
    "name": "hard", "seeds": [0], "device": "cpu",
    "datasets": [{"name": "digits", "args": {"subset_train": 200, "subset_test": 100}}],
    "models": [{"name": "small_cnn", "args": {"width": 8, "hidden": 16}}],
    "methods": ["none"], "training": {"epochs": 1},
}


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY_SCENARIO.format(name="dup") + "attacks: [{name: prune, strengths: [0.5]}]\n")
    with pytest.raises(ConfigError, match=r"line 10: malformed YAML: duplicate key 'attacks'"):
        load_scenario(path)


@pytest.mark.parametrize("attack, strength", [("finetune", 0.5), ("finetune", 1.4), ("overwrite", 2.5), ("scale", 100.0)])
def test_strengths_an_attack_would_round_or_overflow_on_are_refused(tmp_path, attack, strength):
    doc = {**BASE, "attacks": [{"name": attack, "strengths": [strength]}]}
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.strengths\[0\]"):
        parse_scenario(doc, tmp_path)
    parse_scenario({**doc, "attacks": [{"name": attack, "strengths": [2.0]}]}, tmp_path)  # in range


def test_a_training_set_too_small_for_one_step_is_an_error():
    data = DATASETS.build("digits", {"subset_train": 1, "subset_test": 50}).load(None)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    trainer = Trainer(data, TrainingConfig(epochs=1), torch.device("cpu"), torch.Generator().manual_seed(0), progress=False)
    with pytest.raises(ValueError, match="1 training image"):
        trainer.fit(model, lambda *a: None)


def test_an_attack_that_overflows_the_weights_says_so(tmp_path):
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="overflow").replace("strengths: [1.0]", "strengths: [1.0e300]"))
    args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main(args) == 0
    frame = pd.read_csv(tmp_path / "lb" / "overflow.csv")
    attacked = frame[frame.strength > 0]
    assert attacked["detect_note"].str.startswith("the attacked model holds non-finite values in").all()
    clean = frame[frame.strength == 0]["detect_note"].astype("string")
    assert not clean.str.contains("non-finite", na=False).any()


def test_bad_command_line_values_are_one_line_errors(tmp_path, capsys):
    assert main(["inspect", "small_cnn", "--arg", "width=["]) == 2
    assert "--arg width=[: the value is not valid YAML" in capsys.readouterr().err
    results = tmp_path / "r.csv"
    pd.DataFrame([{"scenario": "s", "model": "m", "dataset": "d", "method": "none", "seed": 0, "attack": "noise",
                   "strength": 0.0, "metric": "accuracy", "metric_value": 0.9}]).to_csv(results, index=False)
    # the last four: another scenario's page, null, curve and hold-out curve files
    for name in (".hidden", "x.csv", "a/b", "", "x.html", "x_null", "x_curve", "x_holdout"):
        assert main(["leaderboard", str(results), "--out", str(tmp_path / "lb"), "--name", name]) == 2
        assert "--name" in capsys.readouterr().err
    assert not (tmp_path / "lb").exists() or not any((tmp_path / "lb").iterdir())
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="store"))
    (tmp_path / "store").mkdir()
    assert main(["run", str(tmp_path / "s.yaml"), "--store", str(tmp_path / "store"), "--dry-run"]) == 2  # the user's input, not the machine
    assert f"{tmp_path / 'store'}: not a file" in capsys.readouterr().err


def test_the_null_counts_only_this_grids_watermarked_rows(tmp_path):
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="nullgrid"))
    common = ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main(["run", str(tmp_path / "s.yaml"), *common]) == 0
    store = tmp_path / "c" / "results" / "nullgrid.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    stale = dict(next(r for r in rows if r["method"] == "watermas" and r["strength"] > 0), cell_id="an-older-version-of-the-cell")
    with store.open("a") as fh:  # a row of the same scenario name, from an earlier version of its grid
        fh.write(json.dumps(stale) + "\n")
    assert main(["null", str(tmp_path / "s.yaml"), "--keys", "2", *common]) == 0
    null = pd.read_csv(tmp_path / "lb" / "nullgrid_null.csv")
    noise = null[(null.method == "watermas") & (null.attack == "noise")]
    assert noise["wm_n"].tolist() == [1]  # one seed, one cell: the stale row is not pooled in


def test_an_override_with_an_empty_key_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(TINY_SCENARIO.format(name="override"))
    with pytest.raises(ConfigError, match="each key non-empty"):
        load_scenario(path, ["training..epochs=2"])
    assert load_scenario(path, ["datasets[0].args.subset_train=100"]).datasets[0].obj.subset_train == 100


def test_torchvision_auxiliary_heads_are_refused(tmp_path):
    doc = {**BASE, "models": [{"name": "torchvision", "args": {"arch": "googlenet", "options": {"aux_logits": True}}}]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.args\.options\.aux_logits: not supported"):
        parse_scenario(doc, tmp_path)


def test_a_curve_needs_an_epoch(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="curve0"))
    args = ["curve", str(tmp_path / "s.yaml"), "--set", "training.epochs=0", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"]
    assert main(args) == 2
    assert "training.epochs: expected at least 1 epoch, got 0" in capsys.readouterr().err  # refused at load, as by run


@pytest.mark.parametrize("epochs", [0, -1, -10**6])
def test_a_training_of_no_epochs_is_refused(tmp_path, capsys, epochs):
    # it trained nothing and judged the random initialisation as a trained model
    with pytest.raises(ConfigError, match=rf"^training\.epochs: expected at least 1 epoch, got {epochs}: .*random initialisation"):
        parse_scenario({**BASE, "training": {"epochs": epochs}}, tmp_path)
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="epochs0"))
    args = ["run", str(tmp_path / "s.yaml"), "--set", f"training.epochs={epochs}", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(args) == 2
    assert "training.epochs: expected at least 1 epoch" in capsys.readouterr().err
    assert parse_scenario({**BASE, "training": {"epochs": 1}}, tmp_path).training.epochs == 1
    # an attack's own epochs are its own: fine_prune without fine-tuning still loads
    doc = {**BASE, "attacks": [{"name": "fine_prune", "args": {"epochs": 0}, "strengths": [0.5]}]}
    assert parse_scenario(doc, tmp_path).attacks[0].attack.epochs == 0


def test_sizes_that_only_run_out_of_memory_or_time_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.epochs"):
        parse_scenario({**BASE, "training": {"epochs": 10**20}}, tmp_path)
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.strengths\[0\]: dummy_neurons strength"):
        parse_scenario({**BASE, "attacks": [{"name": "dummy_neurons", "strengths": [1e6]}]}, tmp_path)


def test_a_cuda_device_that_is_not_there_is_named(monkeypatch):
    from wmbench.devices import resolve_device
    from wmbench.errors import WmbenchError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WmbenchError, match="device cuda:7 requested but no CUDA GPU"):
        resolve_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(WmbenchError, match="has 1 CUDA GPU"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
