"""A key is a function of the run's seed alone, also for a keygen that draws from Python's or numpy's
global generators: the pre-flight's draw (``Runner.preflight``, a check before any training) and the
training's agree, whatever ran before them in the process."""

from __future__ import annotations

import json
import os
import random
import textwrap

import numpy as np
import pytest

from wmbench.cli import main

PLUGIN = '''
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from wmbench.methods.uchida import Uchida
from wmbench.registry import METHODS


@METHODS.register("counted_{tag}")
@dataclass(frozen=True)
class Counted(Uchida):
    """Uchida's mark; its keygen logs each call and what it drew from the global generators."""

    resumable = True

    def keygen(self, model, data, rng):
        drawn = {{"random": random.random(), "numpy": float(np.random.rand()), "torch": float(torch.rand(()))}}
        with open(os.environ["KEYGEN_LOG"], "a") as fh:
            fh.write(json.dumps(drawn) + "\\n")
        key = super().keygen(model, data, rng)
        key.meta["drawn"] = drawn
        return key
'''

SCENARIO = """
name: keyonce
seeds: [0, 1]
device: cpu
plugins: [counted.py]
datasets: [{{name: digits, args: {{subset_train: 200, subset_test: 100}}}}]
models: [{{name: small_cnn, args: {{width: 8, hidden: 16}}}}]
methods: [{{name: counted_{tag}, args: {{bits: 16}}}}]
training: {{epochs: 1, batch_size: 100}}
attacks: [{{name: noise, strengths: [0.1]}}]
"""


def run(tmp_path, tag: str, cache: str) -> list[dict]:
    """``wmbench run`` of SCENARIO into ``cache``: the keygen calls it made, in order."""
    (tmp_path / "counted.py").write_text(PLUGIN.format(tag=tag))
    (tmp_path / "s.yaml").write_text(textwrap.dedent(SCENARIO.format(tag=tag)))
    log = tmp_path / f"{cache}.log"
    os.environ["KEYGEN_LOG"] = str(log)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / cache), "--out", str(tmp_path / "lb"), "-q"]) == 0
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _log_env(monkeypatch):
    monkeypatch.setenv("KEYGEN_LOG", "")


@pytest.mark.at_chance("plumbing: the keys drawn per seed")
def test_the_preflight_and_the_training_draw_the_same_key(tmp_path):
    calls = run(tmp_path, "a", "c")
    assert len(calls) == 3  # seed 0: the pre-flight's check and its training; seed 1: its training
    assert calls[0] == calls[1] != calls[2]


@pytest.mark.at_chance("plumbing: the keys drawn per seed")
def test_a_key_depends_on_the_seed_not_on_what_ran_before(tmp_path):
    first = run(tmp_path, "b", "c1")
    random.seed(1234), np.random.seed(1234), random.random(), np.random.rand()  # another history of the process
    second = run(tmp_path, "b", "c2")
    assert first == second
