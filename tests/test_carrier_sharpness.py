"""leaderboard/carrier_sharpness.py: its per-epoch trace re-runs the stored training exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import TINY_SCENARIO

ROOT = Path(__file__).parents[1]


def test_the_trace_ends_where_the_stored_training_is(tmp_path, monkeypatch):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(TINY_SCENARIO.format(name="sharptiny").replace("epochs: 3", "epochs: 2"))
    env = {"WMBENCH_CACHE": str(tmp_path / "cache"), "PATH": str(Path(sys.executable).parent)}
    script = str(ROOT / "leaderboard" / "carrier_sharpness.py")
    for extra in ([], ["--trace"]):
        out = tmp_path / f"sharp{len(extra)}.csv"
        subprocess.run([sys.executable, script, str(scenario), "--out", str(out), *extra], check=True, env=env, capture_output=True)
    stored = pd.read_csv(tmp_path / "sharp0.csv").set_index("method")
    traced = pd.read_csv(tmp_path / "sharp1.csv")
    assert sorted(traced["epoch"].unique()) == [1, 2]
    last = traced[traced["epoch"] == 2].set_index("method")
    for method in ("none", "watermas"):
        assert last.loc[method, "loss_rise"] == stored.loc[method, "loss_rise"]
