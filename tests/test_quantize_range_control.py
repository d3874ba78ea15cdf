"""leaderboard/quantize_range_control.py: the control quantizes only the non-carriers, on their range."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TINY_SCENARIO

from wmbench.models import weight_params
from wmbench.registry import METHODS

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "leaderboard" / "quantize_range_control.py"


def load_script():
    spec = importlib.util.spec_from_file_location("quantize_range_control", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_control_keeps_carriers_and_quantizes_the_rest_on_their_own_range(watermas_model):
    script = load_script()
    model, key = watermas_model
    masks = script.carrier_masks(model, METHODS.build("watermas").carriers(key))
    assert sum(int(m.sum()) for m in masks.values()) == len(key.tensors["flat_idx"])
    control, attack = script.quantized(model, 2, masks), script.quantized(model, 2, None)
    for name, before in weight_params(model).items():
        mask = masks[name]
        after = weight_params(control)[name].detach().view(-1)
        assert torch.equal(after[mask], before.detach().view(-1)[mask])  # carriers untouched
        others = after[~mask]
        assert others.unique().numel() <= 4  # 2 bits
        assert torch.isclose(others.min(), before.detach().view(-1)[~mask].min())  # their own range
        assert weight_params(attack)[name].detach().unique().numel() <= 4


def test_it_runs_on_a_cached_training(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(TINY_SCENARIO.format(name="quanttiny"))
    env = {"WMBENCH_CACHE": str(tmp_path / "cache"), "PATH": str(Path(sys.executable).parent)}
    subprocess.run([sys.executable, "-m", "wmbench", "run", str(scenario), "--out", str(tmp_path), "-q"], check=True, env=env, capture_output=True)
    out = subprocess.run([sys.executable, str(SCRIPT), str(scenario), "watermas:0", "--bits", "4"], check=True, env=env, capture_output=True, text=True).stdout
    assert "watermas seed 0: clean error" in out and "quantize 4: error" in out and "carriers, max |carrier|" in out
