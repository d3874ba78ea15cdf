"""The reference throughput that curve points and grid rows record beside their training times."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY_SCENARIO

import wmbench.machine_speed as machine_speed
from wmbench.cli import main
from wmbench.errors import WmbenchError
from wmbench.machine_speed import process_machine_speed, probe_seconds, reference_images_per_s


def test_probe_measures_a_positive_rate_and_leaves_the_random_state_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    speed = reference_images_per_s(torch.device("cpu"), seconds=0.5)
    assert speed > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_grid_rows_record_the_speed_measured_once_per_process(tmp_path, monkeypatch) -> None:
    calls: list[float] = []
    real = machine_speed.reference_images_per_s
    monkeypatch.setattr(machine_speed, "reference_images_per_s", lambda device, seconds: calls.append(seconds) or real(device, seconds))
    monkeypatch.setenv("WMBENCH_PROBE_SECONDS", "0.3")
    machine_speed._measured_once.cache_clear()
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="speedrows"))
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"]) == 0
    rows = pd.read_csv(tmp_path / "o" / "speedrows.csv")
    assert calls == [0.3]  # two trainings, one probe
    assert rows.reference_images_per_s.notna().all() and rows.reference_images_per_s.nunique() == 1 and (rows.reference_images_per_s > 0).all()
    assert "reference training speed" in (tmp_path / "o" / "speedrows.html").read_text()


def test_probe_seconds_come_from_the_environment_and_zero_turns_it_off(monkeypatch) -> None:
    monkeypatch.setenv("WMBENCH_PROBE_SECONDS", "0")
    assert probe_seconds() == 0 and process_machine_speed(torch.device("cpu")) is None
    for bad in ("-1", "nan", "five"):
        monkeypatch.setenv("WMBENCH_PROBE_SECONDS", bad)
        with pytest.raises(WmbenchError, match="WMBENCH_PROBE_SECONDS"):
            probe_seconds()
