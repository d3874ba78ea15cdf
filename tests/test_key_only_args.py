"""``key_only_args``: the unwatermarked model at several key sizes is one training, keys drawn again."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from wmbench.cli import main
from wmbench.grid import expand
from wmbench.results import MEASURED_COLUMNS
from wmbench.scenario import load_scenario

ROOT = Path(__file__).parents[1]
BOTH = """
name: keysizes
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 300}}]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods:
  - {name: none, label: none-64, args: {n_carriers: 64}}
  - {name: none, label: none-256, args: {n_carriers: 256}}
training: {epochs: 1}
attacks: [{name: key_leak, strengths: [1.0]}, {name: noise, strengths: [0.5]}]
"""


def rows(tmp_path: Path, name: str, text: str) -> pd.DataFrame:
    (tmp_path / f"{name}.yaml").write_text(text)
    assert main(["run", str(tmp_path / f"{name}.yaml"), "--cache", str(tmp_path / f"cache-{name}"), "--out", str(tmp_path / f"lb-{name}"), "-q"]) == 0
    return pd.read_csv(tmp_path / f"lb-{name}" / "keysizes.csv").drop(columns=MEASURED_COLUMNS)


@pytest.mark.at_chance("plumbing: key-only arguments share one training")
def test_key_sizes_of_none_share_one_training_and_match_their_own(tmp_path):
    (tmp_path / "s.yaml").write_text(BOTH)
    cells = expand(load_scenario(tmp_path / "s.yaml"))
    assert len({c.train_id for c in cells}) == 1  # one unwatermarked model...
    assert len({a.cell_id for c in cells for a in c.attacks}) == 2 * 4  # ...read at two key sizes (strength 0 included)
    both = rows(tmp_path, "both", BOTH)
    alone = rows(tmp_path, "alone", BOTH.replace("  - {name: none, label: none-64, args: {n_carriers: 64}}\n", ""))
    # none-256's key, drawn again on the training done for none-64, is the key its own training draws
    pd.testing.assert_frame_equal(both[both["method"] == "none-256"].reset_index(drop=True), alone.reset_index(drop=True))
    assert not both.set_index("method").loc["none-64", "detect_stat"].equals(both.set_index("method").loc["none-256", "detect_stat"])
    assert len(list((tmp_path / "cache-both" / "models").iterdir())) == 1


def test_stored_training_ids_are_unchanged_by_key_only_args():
    """Golden ids: the default `none` and WaterMAS trainings of the quickstart keep their cache
    entries (a change here re-trains every stored model: bump TRAIN_FORMAT on purpose, not by accident)."""
    ids = {(c.method.label, c.seed): c.train_id for c in expand(load_scenario(ROOT / "scenarios" / "quickstart.yaml"))}
    assert ids[("none", 0)] == "3da32b1ea77ab96d"
    assert ids[("watermas", 0)] == "f1259d97e17d672f"
