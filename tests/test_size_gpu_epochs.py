"""scripts/size_gpu_epochs.py: the most epochs whose estimated cost fits SAFETY x the seconds left."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "size_gpu_epochs.py"
SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "paper_gpu.yaml"


def sized(tmp_path: Path, seconds: float, epoch_s: float = 1.0, eval_s: float = 0.1) -> ModuleType:
    """Run the script's main on paper_gpu.yaml with a probe store of ``epoch_s`` and ``eval_s``."""
    store = tmp_path / "probe.jsonl"
    store.write_text(json.dumps({"train_s_per_epoch": epoch_s, "eval_s": eval_s}) + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("size_gpu_epochs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv, sys.argv = sys.argv, ["size_gpu_epochs", str(SCENARIO), str(store), str(seconds)]
    try:
        assert module.main() == 0
    finally:
        sys.argv = argv
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
