"""One failing cell never aborts the grid: its row says why, the rest runs, the leaderboard is
written, the exit code is 3, and a rerun retries only the failed cells."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
import pytest

from wmbench.cli import EXIT_CELLS_FAILED, main
from wmbench.train import Trainer

# An attack that raises while BOOM_ATTACK is set, and a method whose training always raises:
# stand-ins for plug-in bugs (any Exception, not only wmbench's own errors).
PLUGIN = '''
import os
from dataclasses import dataclass

from wmbench.api import Attack
from wmbench.methods.none import NoWatermark
from wmbench.registry import ATTACKS, METHODS


@ATTACKS.register("flaky_{tag}")
@dataclass(frozen=True)
class Flaky(Attack):
    """Raises a plain KeyError while the environment variable BOOM_ATTACK is set."""

    def attack(self, model, strength, ctx):
        if os.environ.get("BOOM_ATTACK"):
            raise KeyError("plug-in bug in flaky")


@METHODS.register("diverges_{tag}")
@dataclass(frozen=True)
class Diverges(NoWatermark):
    """Its training always fails."""

    def training_step(self, model, batch, loss_fn, optimizer, key):
        raise FloatingPointError("loss is nan")
'''

SCENARIO = """
name: failing
seeds: [0]
device: cpu
plugins: [boom.py]
datasets: [{{name: digits, args: {{subset_train: 200, subset_test: 100}}}}]
models: [{{name: small_cnn, args: {{width: 8, hidden: 16}}}}]
methods: [none, diverges_{tag}]
training: {{epochs: 1, batch_size: 100}}
attacks:
  - {{name: noise, strengths: [1.0]}}
  - {{name: flaky_{tag}, strengths: [1.0]}}
"""


def write(tmp_path, tag):
    (tmp_path / "boom.py").write_text(PLUGIN.format(tag=tag))
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SCENARIO.format(tag=tag)))
    return ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]


@pytest.mark.at_chance("plumbing: a failed cell's row and exit code")
def test_failed_cells_are_recorded_and_the_rest_runs(tmp_path, capsys, monkeypatch):
    args = write(tmp_path, "a")
    monkeypatch.setenv("BOOM_ATTACK", "1")
    assert main(args) == EXIT_CELLS_FAILED == 3
    err = capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "lb" / "failing.csv")  # the leaderboard is written anyway
    assert len(frame) == 8  # 2 methods x (noise 0, 1 + flaky 0, 1)
    failed = frame[frame["failure"].notna()].set_index(["method", "attack", "strength"])["failure"]
    # the training failure fails every attack cell of that training, with its reason
    assert all(failed[("diverges_a", a, s)] == "training: FloatingPointError: loss is nan"
               for a in ("noise", "flaky_a") for s in (0.0, 1.0))
    assert failed[("none", "flaky_a", 1.0)] == "attack: KeyError: 'plug-in bug in flaky'"
    assert len(failed) == 5
    ran = frame[frame["failure"].isna()]
    assert len(ran) == 3 and ran["error"].notna().all() and ran["detect_stat"].notna().all()
    # a short summary on stderr, one line per training and reason
    assert "5 of 8 cells failed" in err and "KeyError: 'plug-in bug in flaky'" in err and "Traceback" not in err
    assert "small_cnn/digits/diverges_a/seed 0 (4 cells): training: FloatingPointError: loss is nan" in err

    # The bug is fixed (the environment, not the code, so the cell ids stay): a rerun retries only
    # the failed cells, and the one training that worked is not repeated.
    monkeypatch.delenv("BOOM_ATTACK")
    store = tmp_path / "c" / "results" / "failing.jsonl"
    before = store.read_text().splitlines()
    trained = []
    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: trained.append(self.desc) or original_fit(self, *a, **k))
    assert main(args) == EXIT_CELLS_FAILED  # diverges still fails
    after = store.read_text().splitlines()
    retried = [json.loads(line) for line in after[len(before):]]
    assert sorted((r["method"], r["attack"], r["strength"]) for r in retried) == sorted(failed.index)
    assert all("diverges" in d for d in trained)
    frame = pd.read_csv(tmp_path / "lb" / "failing.csv")
    assert len(frame) == 8 and frame["failure"].notna().sum() == 4  # the flaky cell now has its row
    fixed = frame[(frame.method == "none") & (frame.attack == "flaky_a") & (frame.strength == 1.0)]
    assert fixed["failure"].isna().all() and fixed["error"].notna().all()


@pytest.mark.at_chance("plumbing: the exit code and the failure column")
def test_a_run_without_failures_exits_0_and_has_an_empty_failure_column(tmp_path, capsys):
    args = write(tmp_path, "b")
    text = (tmp_path / "s.yaml").read_text().replace("methods: [none, diverges_b]", "methods: [none]")
    (tmp_path / "s.yaml").write_text(text)
    assert main(args) == 0
    assert "failed" not in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "lb" / "failing.csv")["failure"].isna().all()


@pytest.fixture(autouse=True)
def _no_boom(monkeypatch):
    monkeypatch.delenv("BOOM_ATTACK", raising=False)
