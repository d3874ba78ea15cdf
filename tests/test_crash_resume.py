"""Crash-proof runs: SIGKILL `wmbench run` mid-training and mid-attack, rerun, get the same CSV."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from wmbench.cache import TrainCache
from wmbench.cli import main
from wmbench.results import MEASURED_COLUMNS

EPOCHS = 150
SCENARIO = f"""
name: killme
seeds: [0]
device: cpu
datasets: [{{name: digits, args: {{subset_train: 300}}}}]
models: [{{name: small_cnn, args: {{width: 8, hidden: 16}}}}]
methods: [none, {{name: watermas, args: {{n_carriers: 128}}}}]
training: {{epochs: {EPOCHS}, batch_size: 32}}
attacks:
  - {{name: finetune, strengths: [10, 20, 30]}}
"""
CELLS = 2 * 4  # methods x strengths (0 included)


def start(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """``python -m wmbench.cli run`` in a child process, its progress bars going to a file."""
    log = tmp_path / f"{name}.log"
    args = [sys.executable, "-m", "wmbench.cli", "run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lb")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # as the reference run; no oversubscribed cores
    with open(log, "wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=fh, env=env), log


def kill_when(proc: subprocess.Popen, ready, timeout: float = 180.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def epochs_done(log: Path, method: str) -> int:
    """The epoch counter of ``method``'s training in the progress bars printed so far."""
    text = log.read_bytes().decode("utf-8", "replace")
    found = re.findall(rf"train small_cnn/digits/{method}/seed0:.*?\| *(\d+)/{EPOCHS} ", text)
    return max(map(int, found), default=0)


def results_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "cache" / "results" / "killme.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def finished_trainings(tmp_path: Path) -> int:
    models = tmp_path / "cache" / "models"
    return sum(TrainCache(tmp_path / "cache").has(d.name) for d in models.iterdir()) if models.is_dir() else 0


def test_sigkill_mid_training_and_mid_attack_then_rerun_gives_the_uninterrupted_csv(tmp_path):
    (tmp_path / "s.yaml").write_text(SCENARIO)
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results depend on the thread count: the same as the child processes
    try:
        assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(reference / "cache"), "--out", str(reference / "lb"), "-q"]) == 0
    finally:
        torch.set_num_threads(threads)

    # 1. killed while the second training (watermas) is a few epochs in: the first one is stored
    proc, log = start(tmp_path, "first")
    kill_when(proc, lambda: epochs_done(log, "watermas") >= 5)
    assert epochs_done(log, "watermas") < EPOCHS
    assert finished_trainings(tmp_path) == 1
    killed_in_training = len(results_lines(tmp_path))

    # 2. killed in the attack stage, once at least one more row is stored
    proc, log = start(tmp_path, "second")
    kill_when(proc, lambda: len(results_lines(tmp_path)) > killed_in_training)
    stored = len(results_lines(tmp_path))
    assert stored < CELLS, "the run finished before the kill"

    # 3. the same command again finishes the grid
    proc, log = start(tmp_path, "third")
    assert proc.wait(300) == 0, log.read_text()
    lines = results_lines(tmp_path)
    cell_ids = [json.loads(line)["cell_id"] for line in lines]
    assert len(lines) == CELLS and len(set(cell_ids)) == CELLS  # nothing lost, nothing duplicated
    assert finished_trainings(tmp_path) == 2

    got = pd.read_csv(tmp_path / "lb" / "killme.csv")
    want = pd.read_csv(reference / "lb" / "killme.csv")
    assert len(got) == CELLS
    pd.testing.assert_frame_equal(got.drop(columns=MEASURED_COLUMNS), want.drop(columns=MEASURED_COLUMNS))
