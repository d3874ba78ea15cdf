"""The null treats an attack's failures as the grid treats them: a scenario error names its
``attacks[i]`` entry as the run's message does; any other failure fails that (attack, strength)'s
draws only, its reason in the CSV's note as a failed detection's, while a machine fault (a full
disk, in an attack or a detector) still stops it; and an attacked model left with non-finite
weights is noted, as a grid row notes it."""

from __future__ import annotations

import errno

import pandas as pd
import pytest
from conftest import plugin_scenario, run_scenario

from wmbench.cli import main
from wmbench.null import run_null
from wmbench.null_report import null_table, write_null
from wmbench.scenario import load_scenario

PLUGIN = '''
import errno
from dataclasses import dataclass
from typing import ClassVar

import torch

from wmbench.api import Attack
from wmbench.errors import ConfigError
from wmbench.methods.watermas import WaterMAS
from wmbench.registry import ATTACKS, METHODS


@ATTACKS.register("nullfail_bad_level")
@dataclass(frozen=True)
class BadLevel(Attack):
    """A scenario error found only when attacking."""

    level: int = 3

    def attack(self, model, strength, ctx):
        raise ConfigError("args.level", f"level {self.level} is out of range for this model")


@ATTACKS.register("nullfail_boom")
@dataclass(frozen=True)
class BoomAtTwo(Attack):
    """A plug-in bug at strength 2; the model left as it is at any other strength."""

    def attack(self, model, strength, ctx):
        if strength == 2:
            raise RuntimeError("boom at 2")


@ATTACKS.register("nullfail_keyed_boom")
@dataclass(frozen=True)
class KeyedBoomAtTwo(BoomAtTwo):
    """The same, reading the key (applied once per null key)."""

    uses_key: ClassVar[bool] = True


@ATTACKS.register("nullfail_disk_full")
@dataclass(frozen=True)
class DiskFull(Attack):
    def attack(self, model, strength, ctx):
        raise OSError(errno.ENOSPC, "No space left on device")


@METHODS.register("nullfail_disk_full_detector")
@dataclass(frozen=True)
class DiskFullDetector(WaterMAS):
    """WaterMAS, whose detector finds the disk full."""

    def detect(self, model, key):
        raise OSError(errno.ENOSPC, "No space left on device")


@ATTACKS.register("nullfail_nan_bias")
@dataclass(frozen=True)
class NaNBias(Attack):
    """Leaves a NaN in the classifier's bias."""

    def attack(self, model, strength, ctx):
        with torch.no_grad():
            model[-1].bias[0] = float("nan")
'''

METHODS = "none, {name: watermas, args: {n_carriers: 64}}"
KEYS = 3
DRAWS = 3 * KEYS  # keys x the 3 unwatermarked models the null trains
FAILING = "{name: nullfail_boom, strengths: [1, 2]}, {name: nullfail_keyed_boom, strengths: [1, 2]}, {name: nullfail_nan_bias, strengths: [1]}"
SPARED = "{name: nullfail_boom, strengths: [1]}, {name: nullfail_keyed_boom, strengths: [1]}, {name: nullfail_nan_bias, strengths: [1]}"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """One folder (and cache) for every test: the plug-in registers once, the trainings are shared."""
    tmp = tmp_path_factory.mktemp("nullfail")
    (tmp / "plugin.py").write_text(PLUGIN)
    plugin_scenario(tmp, tmp / "plugin.py", METHODS, f"{{name: noise, strengths: [0.1]}}, {FAILING}", name="failing")
    plugin_scenario(tmp, tmp / "plugin.py", METHODS, f"{{name: noise, strengths: [0.1]}}, {SPARED}", name="spared")
    plugin_scenario(tmp, tmp / "plugin.py", METHODS, "{name: noise, strengths: [0.1]}, {name: nullfail_bad_level, strengths: [1]}", name="badlevel")
    plugin_scenario(tmp, tmp / "plugin.py", METHODS, "{name: nullfail_disk_full, strengths: [1]}", name="diskfull")
    plugin_scenario(tmp, tmp / "plugin.py", "none, {name: nullfail_disk_full_detector, args: {n_carriers: 64}}", "{name: noise, strengths: [0.1]}", name="detectordisk")
    return tmp


def cli(tmp, command: str, name: str, capsys) -> tuple[int, str]:
    """``wmbench <command>`` on scenario ``name`` (quiet): its exit code and its last stderr line."""
    capsys.readouterr()
    code = main([command, str(tmp / f"{name}.yaml"), "--cache", str(tmp / "c"), "--out", str(tmp / "out"), "-q", *(["--keys", "2"] if command == "null" else [])])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_an_attacks_scenario_error_names_its_entry_in_the_null_as_in_the_run(tmp, capsys):
    run_code, run_error = cli(tmp, "run", "badlevel", capsys)
    null_code, null_error = cli(tmp, "null", "badlevel", capsys)
    assert run_code == null_code == 2
    assert run_error == f"wmbench: error: {tmp / 'badlevel.yaml'}: attacks[1].args.level: level 3 is out of range for this model"
    assert null_error == run_error


def test_a_failing_attack_fails_only_its_own_null_draws(tmp):
    failing = run_null(load_scenario(tmp / "failing.yaml"), tmp / "c", "cpu", KEYS, progress=False)
    spared = run_null(load_scenario(tmp / "spared.yaml"), tmp / "c", "cpu", KEYS, progress=False)
    for attack in ("nullfail_boom", "nullfail_keyed_boom"):
        sample = failing[("small_cnn", "digits", "watermas", attack, 2.0)]
        assert (sample.stats, sample.skipped, sample.failed, sample.failure) == ([], 0, DRAWS, "attack: RuntimeError: boom at 2")
    assert set(spared) == set(failing) - {("small_cnn", "digits", "watermas", a, 2.0) for a in ("nullfail_boom", "nullfail_keyed_boom")}
    for key, sample in spared.items():  # every other draw as in a scenario without the failing strength
        assert (failing[key].stats, failing[key].pvalues, failing[key].failed) == (sample.stats, sample.pvalues, 0), key
        assert len(sample.stats) == DRAWS, key
    tables = [null_table(s, {}, "t", 1e-6, "cpu", 1).set_index(["attack", "strength"]) for s in (failing, spared)]
    assert tables[0].loc[tables[1].index].drop(columns="scenario").equals(tables[1].drop(columns="scenario"))  # operating points unaffected


def test_the_null_exits_3_when_draws_failed_as_the_run_does_for_failed_cells(tmp, capsys):
    code, message = cli(tmp, "null", "failing", capsys)
    assert code == 3 and "null draws failed" in message
    assert main(["null", str(tmp / "spared.yaml"), "--cache", str(tmp / "c"), "--out", str(tmp / "out"), "-q", "--keys", "2"]) == 0


def test_the_nulls_csv_and_markdown_say_which_draws_an_attack_failed(tmp):
    failing = run_null(load_scenario(tmp / "failing.yaml"), tmp / "c", "cpu", KEYS, progress=False)
    csv, md = write_null(null_table(failing, {}, "failing", 1e-6, "cpu", 1), tmp / "report", "failing", KEYS, [0, 1, 2])
    row = pd.read_csv(csv).set_index(["attack", "strength"]).loc[("nullfail_boom", 2.0)]
    assert (row["null_n"], row["null_skipped"]) == (0, 0) and pd.isna(row["fpr"])
    assert f"{DRAWS} draws failed (attack: RuntimeError: boom at 2)" in row["note"]
    cells = next(cells for cells in ([c.strip() for c in line.split("|")] for line in md.read_text().splitlines()) if cells[2:4] == ["nullfail_boom", "2"])
    assert cells[4:6] == ["n/a", "n/a"]  # no draw, no share: as for a detector that failed every draw
    failed = md.read_text().split("## Failed draws\n", 1)[1]  # the reason too, not only the CSV's note
    assert any("nullfail_boom" in line and f"| {DRAWS} " in line and "attack: RuntimeError: boom at 2" in line for line in failed.splitlines())


def test_a_machine_fault_in_an_attack_still_stops_the_null(tmp, capsys):
    with pytest.raises(OSError) as info:
        run_null(load_scenario(tmp / "diskfull.yaml"), tmp / "c", "cpu", 2, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert cli(tmp, "null", "diskfull", capsys)[0] == 4


def test_a_machine_fault_in_a_detector_stops_the_null_as_it_stops_the_run(tmp, capsys):
    """Unlike a detector's bug, which fails its draws only (test_plugin_edges)."""
    assert cli(tmp, "run", "detectordisk", capsys)[0] == 4
    with pytest.raises(OSError) as info:
        run_null(load_scenario(tmp / "detectordisk.yaml"), tmp / "c", "cpu", 2, progress=False)
    assert info.value.errno == errno.ENOSPC


def test_the_null_notes_an_attacked_model_with_non_finite_weights_as_the_grid_does(tmp):
    code, frame = run_scenario(tmp / "failing.yaml", tmp / "c")
    assert code == 3  # the grid's rows at strength 2 failed
    row = frame[(frame["method"] == "watermas") & (frame["attack"] == "nullfail_nan_bias") & (frame["strength"] == 1)].iloc[0]
    assert "the attacked model holds non-finite values in 10.bias" in row["detect_note"]
    failing = run_null(load_scenario(tmp / "failing.yaml"), tmp / "c", "cpu", KEYS, progress=False)
    sample = failing[("small_cnn", "digits", "watermas", "nullfail_nan_bias", 1.0)]
    assert (sample.nonfinite, sample.nonfinite_in) == (DRAWS, "10.bias")
    table = null_table(failing, {}, "failing", 1e-6, "cpu", 1).set_index(["attack", "strength"])
    assert f"{DRAWS} draws on attacked models holding non-finite values (first in 10.bias)" in table.loc[("nullfail_nan_bias", 1.0), "note"]
    assert "non-finite" not in table.loc[("noise", 0.1), "note"]
