"""scripts/size_gpu_epochs.py: the most epochs whose estimated cost fits SAFETY x the seconds left."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "size_gpu_epochs.py"
SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "paper_gpu.yaml"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("size_gpu_epochs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(*args: str) -> tuple[ModuleType, int]:
    """The script's main with ``args``, and its exit status."""
    module = load_script()
    argv, sys.argv = sys.argv, ["size_gpu_epochs", *args]
    try:
        return module, module.main()
    finally:
        sys.argv = argv


def sized(tmp_path: Path, seconds: float, epoch_s: float = 1.0, eval_s: float = 0.1) -> ModuleType:
    """Run the script's main on paper_gpu.yaml with a probe store of ``epoch_s`` and ``eval_s``."""
    store = tmp_path / "probe.jsonl"
    store.write_text(json.dumps({"train_s_per_epoch": epoch_s, "eval_s": eval_s}) + "\n", encoding="utf-8")
    module, status = main(str(SCENARIO), str(store), str(seconds))
    assert status == 0
    return module


@pytest.mark.parametrize("seconds", [400, 1200])
def test_epochs_fit_the_budget_and_one_more_would_not(tmp_path: Path, capsys: pytest.CaptureFixture[str], seconds: float) -> None:
    module = sized(tmp_path, seconds)
    captured = capsys.readouterr()
    epochs = int(captured.out.strip())
    fits = float(captured.err.split(f"{epochs} epochs cost about ")[1].split(" s")[0])
    too_much = float(captured.err.split(f"{epochs + 1} would cost ")[1].split(" s")[0])
    assert epochs >= 1
    assert fits <= module.SAFETY * seconds < too_much


def test_more_seconds_or_a_faster_epoch_afford_more_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def epochs(seconds: float, epoch_s: float) -> int:
        sized(tmp_path, seconds, epoch_s)
        return int(capsys.readouterr().out.strip())

    assert epochs(400, 1.0) < epochs(1200, 1.0)
    assert epochs(600, 2.0) < epochs(600, 1.0)


def measured_csv(tmp_path: Path, labels: list[str], epoch_s: float) -> Path:
    """A results CSV of an earlier run: every method label at ``epoch_s`` s/epoch, 0.1 s per evaluation."""
    rows = [
        {"scenario": "paper_gpu", "model": "resnet18_cifar", "dataset": "cifar10", "method": label, "seed": seed,
         "attack": "noise", "strength": 0.1, "metric": "accuracy", "metric_value": 0.9, "error": 10.0,
         "train_s_per_epoch": epoch_s + seed, "eval_s": 0.06, "attack_s": 0.04}
        for label in labels for seed in range(3)
    ]
    path = tmp_path / "measured.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


LABELS = ["none", "watermas", "frozen-lam0", "uchida", "tartaglione", "li_sign", "hufunet"]


def test_measured_figures_size_each_label_at_its_slowest_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --measured, E epochs cost 21 trainings x (slowest seed's s/epoch) x E + 504 x 0.1 s + 21 x 3 s."""
    csv = measured_csv(tmp_path, LABELS, epoch_s=1.0)  # the slowest seed: 3.0 s per epoch
    module, status = main(str(SCENARIO), "--measured", str(csv), "1000")
    assert status == 0
    epochs = int(capsys.readouterr().out.strip())
    cost = lambda e: 21 * 3.0 * e + 504 * 0.1 + 21 * module.PER_TRAINING_S  # noqa: E731
    assert cost(epochs) <= module.SAFETY_MEASURED * 1000 < cost(epochs + 1)


def test_measured_figures_without_a_label_of_the_scenario_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = measured_csv(tmp_path, [label for label in LABELS if label != "tartaglione"], epoch_s=1.0)
    _, status = main(str(SCENARIO), "--measured", str(csv), "1000")
    assert status == 1
    assert "no seconds per epoch for tartaglione" in capsys.readouterr().err
