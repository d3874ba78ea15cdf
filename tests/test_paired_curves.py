"""leaderboard/paired_curves.py: treatment minus control at the last epoch, paired by seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "leaderboard" / "paired_curves.py"


def curve(values: dict[int, float], flip: float | None = None) -> pd.DataFrame:
    rows = []
    for seed, value in values.items():
        for epoch in (1, 2):
            rows.append({"model": "m", "dataset": "d", "seed": seed, "epoch": epoch, "epochs": 2,
                         "metric_value": value if epoch == 2 else 0.0, "metric_value_flip": flip, "metric_value_flip_translate": None})
    return pd.DataFrame(rows)


def test_differences_are_paired_by_seed_at_the_last_epoch(tmp_path):
    curve({0: 0.80, 1: 0.82, 2: 0.81}, flip=0.9).to_csv(tmp_path / "t.csv", index=False)
    curve({0: 0.79, 1: 0.80, 2: 0.81, 3: 0.5}).to_csv(tmp_path / "c.csv", index=False)  # seed 3 has no partner
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "t.csv"), str(tmp_path / "c.csv")], capture_output=True, text=True, check=True).stdout
    assert "m/d metric_value: +1.00 [" in out and "over 3 seeds (seed 0: +1.00, seed 1: +2.00, seed 2: +0.00)" in out
    assert "metric_value_flip" not in out  # the control did not measure it


def test_controls_from_several_files_pair_together_and_a_seed_twice_is_refused(tmp_path):
    curve({0: 0.80, 1: 0.82}).to_csv(tmp_path / "t.csv", index=False)
    curve({0: 0.79}).to_csv(tmp_path / "c0.csv", index=False)
    curve({1: 0.80}).to_csv(tmp_path / "c1.csv", index=False)
    run = [sys.executable, str(SCRIPT), str(tmp_path / "t.csv"), str(tmp_path / "c0.csv"), str(tmp_path / "c1.csv")]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "over 2 seeds (seed 0: +1.00, seed 1: +2.00)" in out
    twice = subprocess.run([*run, str(tmp_path / "c0.csv")], capture_output=True, text=True)
    assert twice.returncode != 0 and "m/d seed 0 is measured twice in" in twice.stderr
