"""Scenario files are validated; every error names the file, the field and the closest valid names."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from wmbench.errors import ConfigError
from wmbench.scenario import load_scenario
from wmbench.yaml_doc import read_yaml

MINIMAL = """
name: tiny
seeds: [0]
datasets: [synthetic]
models: [small_cnn]
methods: [none, watermas]
training: {epochs: 1}
attacks:
  - name: noise
    strengths: [0.5, 1.0]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_minimal_scenario_loads_with_defaults_and_a_clean_strength(tmp_path):
    s = load_scenario(write(tmp_path, MINIMAL))
    assert s.name == "tiny" and s.seeds == (0,)
    assert [m.label for m in s.methods] == ["none", "watermas"]
    assert s.attacks[0].strengths == (0.0, 0.5, 1.0)
    assert s.training.epochs == 1 and s.training.batch_size == 64
    assert s.detection.threshold == 1e-6


def test_floats_written_without_a_dot_are_floats(tmp_path):
    # PyYAML reads YAML 1.1, where 1e-6 is a string; wmbench reads it as YAML 1.2 does
    text = MINIMAL.replace("training: {epochs: 1}", "training: {epochs: 1, lr: 5e-2, weight_decay: 5E-4}\ndetection: {threshold: 1e-9}")
    s = load_scenario(write(tmp_path, text))
    assert (s.training.lr, s.training.weight_decay, s.detection.threshold) == (0.05, 5e-4, 1e-9)
    s = load_scenario(write(tmp_path, MINIMAL), ["detection.threshold=1e-12", "methods[1].args.rho=2e-1"])
    assert s.detection.threshold == 1e-12 and s.methods[1].obj.rho == 0.2
    with pytest.raises(ConfigError, match=r"methods\[1\]: unknown method '1e5'"):  # a quoted one stays a string
        load_scenario(write(tmp_path, MINIMAL.replace("methods: [none, watermas]", "methods: [none, '1e5']")))


@pytest.mark.parametrize("text,value", [
    ("01024", 1024), ("010", 10), ("[010]", [10]), ("0o17", 15), ("0x1F", 31), ("-5", -5), ("+5", 5),  # YAML 1.1: 532, 8, [8]
    ("1:30", "1:30"), ("0b101", "0b101"), ("1_000", "1_000"), ("-0x10", "-0x10"),  # 1.1: 90, 5, 1000, -16
    ("1:30.5", "1:30.5"), ("1_000.5", "1_000.5"), (".5", 0.5), ("1e-6", 1e-6), ("-.inf", float("-inf")), ("!!int 010", 10),
])
def test_numbers_are_read_as_yaml_1_2_reads_them(text, value):
    got = read_yaml(text)
    assert got == value and type(got) is type(value)


def test_yaml_1_1_integers_do_not_change_a_scenario(tmp_path):
    text = MINIMAL.replace("methods: [none, watermas]", "methods: [none, {name: watermas, args: {n_carriers: 01024}}]")
    s = load_scenario(write(tmp_path, text.replace("training: {epochs: 1}", "training: {epochs: 010}")), ["attacks[0].strengths=[010]"])
    assert (s.methods[1].obj.n_carriers, s.training.epochs, s.attacks[0].strengths) == (1024, 10, (0.0, 10.0))
    with pytest.raises(ConfigError, match=r"training.epochs.*'1:30'"):  # not 90 epochs
        load_scenario(write(tmp_path, MINIMAL.replace("training: {epochs: 1}", "training: {epochs: 1:30}")))


@pytest.mark.parametrize("text,value", [
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("n", "n"),  # YAML 1.1: booleans
    ("Yes", "Yes"), ("NO", "NO"), ("On", "On"), ("OFF", "OFF"), ("[no, yes]", ["no", "yes"]),
    ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False),
    ("tRUE", "tRUE"), ("!!bool true", True),
])
def test_booleans_are_read_as_yaml_1_2_reads_them(text, value):
    got = read_yaml(text)
    assert got == value and type(got) is type(value)


def test_an_explicit_yaml_1_1_boolean_is_refused():
    with pytest.raises(yaml.YAMLError, match="not a YAML 1.2 boolean"):
        read_yaml("!!bool yes")


def test_yaml_1_1_booleans_are_strings_in_a_scenario(tmp_path):
    # YAML 1.1 read the label 'no' as False (refused as not a string) and 'off' as False
    text = MINIMAL.replace("methods: [none, watermas]", "methods: [none, {name: watermas, label: no}]")
    text = text.replace("datasets: [synthetic]", "datasets: [{name: synthetic, label: off}]")
    s = load_scenario(write(tmp_path, text))
    assert [m.label for m in s.methods] == ["none", "no"] and s.datasets[0].label == "off"


@pytest.mark.parametrize("change, field", [
    (("training: {epochs: 1}", "training: {epochs: 1, flip: yes}"), "training.flip"),
    (("training: {epochs: 1}", "training: {epochs: 1, channels_last: on}"), "training.channels_last"),  # bool | None
    (("methods: [none, watermas]", "methods: [none, {name: watermas, args: {align: yes}}]"), r"methods\[1\].args.align"),
    (("methods: [none, watermas]", "methods: [none, {name: watermas, label: w+r, resync: yes}]"), r"methods\[1\].resync"),
])
def test_a_yaml_1_1_boolean_in_a_boolean_field_is_a_clear_error(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field + r": expected .*true or false.*got 'yes'|" + field + r": expected .*got 'on'") as info:
        load_scenario(write(tmp_path, MINIMAL.replace(*change)))
    assert "YAML 1.2" in str(info.value) and "write true or false" in str(info.value)
    with pytest.raises(ConfigError, match=r"training.flip: expected true or false, got 'on'.*write true or false"):
        load_scenario(write(tmp_path, MINIMAL), ["training.flip=on"])


def test_no_attacks_means_the_clean_model_only(tmp_path):
    s = load_scenario(write(tmp_path, MINIMAL.split("attacks:")[0]))
    assert [(a.label, a.strengths) for a in s.attacks] == [("none", (0.0,))]


@pytest.mark.parametrize(
    "change, field, hint",
    [
        (("methods: [none, watermas]", "methods: [none, watermass]"), "methods[1]", "watermas"),
        (("models: [small_cnn]", "models: [small_cn]"), "models[0]", "small_cnn"),
        (("training: {epochs: 1}", "training: {epochs: 1, lrr: 0.1}"), "training.lrr", "lr"),
        (("training: {epochs: 1}", "training: {epochs: -1}"), "training.epochs", "expected at least 1 epoch"),
        (("training: {epochs: 1}", "training: {epochs: one}"), "training.epochs", "expected int"),
        (("methods: [none, watermas]", "methods: [{name: watermas, args: {rhoo: 1}}]"), "methods[0].args.rhoo", "rho"),
        (("strengths: [0.5, 1.0]", "strengths: [-1]"), "attacks[0].strengths[0]", ">= 0"),
        (("name: tiny", "nme: tiny"), "nme", "name"),
        (("methods: [none, watermas]", "methods: [none, none]"), "methods[1].label", "used twice"),
        # a label naming another component would make its rows read as that one's
        (("methods: [none, watermas]", "methods: [{name: tartaglione, label: none}]"), "methods[0].label", "the name of another method"),
        (("models: [small_cnn]", "models: [{name: small_cnn, label: resnet18}]"), "models[0].label", "the name of another model"),
        (("name: noise", "name: noise\n    label: prune"), "attacks[0].label", "the name of another attack"),
        (("methods: [none, watermas]", "methods: [{name: watermas, label: '  '}]"), "methods[0].label", "non-empty"),
        # strengths that a result CSV writes alike would be one leaderboard row
        (("strengths: [0.5, 1.0]", "strengths: [0.3, 0.3000001]"), "attacks[0].strengths", "written alike"),
        # a strength listed twice ran once, silently: a typo (1.0 for 2.0) went unseen
        (("strengths: [0.5, 1.0]", "strengths: [1.0, 1.0]"), "attacks[0].strengths[1]", "repeats strengths[0]"),
        (("strengths: [0.5, 1.0]", "strengths: [0.5, 1, 1.0]"), "attacks[0].strengths[2]", "repeats strengths[1]"),
    ],
)
def test_errors_name_file_field_and_suggestion(tmp_path, change, field, hint):
    path = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    message = str(err.value)
    assert str(path) in message and field in message and hint in message


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"s.yaml: line \d+: malformed YAML"):
        load_scenario(write(tmp_path, "name: x\nmethods: [none\n"))


def test_shipped_scenarios_load():
    for path in sorted(Path(__file__).parents[1].joinpath("scenarios").rglob("*.yaml")):
        assert load_scenario(path).name == path.stem


def test_set_overrides_any_field_before_validation(tmp_path):
    path = write(tmp_path, MINIMAL)
    s = load_scenario(path, ["training.epochs=3", "datasets[0].args.n_train=32", "attacks.0.strengths=[0.2]", "seeds=[4, 5]"])
    assert s.training.epochs == 3 and s.seeds == (4, 5)
    assert s.datasets[0].obj.n_train == 32 and s.datasets[0].label == "synthetic"
    assert s.attacks[0].strengths == (0.0, 0.2)
    with pytest.raises(ConfigError, match="training.lrr: unknown field"):
        load_scenario(path, ["training.lrr=1"])
    with pytest.raises(ConfigError, match=r"--set: models\[3\]: no list entry 3"):
        load_scenario(path, ["models[3].args.width=2"])  # the error names the --set, not a line of the file
    with pytest.raises(ConfigError, match=r"models\[-1\]: no list entry -1"):
        load_scenario(path, ["models[-1]=small_cnn"])
    with pytest.raises(ConfigError, match=r"--set: training.milestones: not in the file, so it has no entry 0; set the whole list"):
        load_scenario(path, ["training.milestones[0]=3"])  # was: 'expected a list, got {'0': 3}'


def test_a_model_can_be_restricted_to_some_datasets(tmp_path):
    from wmbench.grid import expand

    text = MINIMAL.replace("datasets: [synthetic]", "datasets: [synthetic, {name: digits, label: dig}]")
    text = text.replace("models: [small_cnn]", "models: [small_cnn, {name: small_cnn, label: only_dig, datasets: [dig]}]")
    cells = expand(load_scenario(write(tmp_path, text)))
    pairs = {(c.model.label, c.dataset.label) for c in cells}
    assert pairs == {("small_cnn", "synthetic"), ("small_cnn", "dig"), ("only_dig", "dig")}
    with pytest.raises(ConfigError, match=r"models\[1\].datasets: no dataset labelled 'digit'"):
        load_scenario(write(tmp_path, text.replace("datasets: [dig]", "datasets: [digit]")))
