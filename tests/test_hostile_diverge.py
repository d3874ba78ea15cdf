"""A training whose loss or weights become non-finite fails its cell with TrainingDiverged, naming
the cell, and no model is cached (a NaN model must never publish figures)."""

from __future__ import annotations

import pytest
import torch

from wmbench.errors import TrainingDiverged, WmbenchError
from wmbench.grid import expand
from wmbench.scenario import parse_scenario
from wmbench.worker import CellWorker

DOC = {
    "name": "div", "seeds": [0], "device": "cpu",
    "datasets": [{"name": "digits", "args": {"subset_train": 200}}],
    "models": [{"name": "small_cnn", "args": {"width": 4, "hidden": 8}}],
    "training": {"epochs": 1},
}


@pytest.mark.parametrize("method, training", [
    ({"name": "none", "args": {"n_carriers": 64}}, {"lr": 1e30}),
    ({"name": "watermas", "args": {"n_carriers": 64, "rho": 1e30}}, {}),
])
def test_non_finite_training_raises_and_caches_nothing(tmp_path, method, training):
    doc = {**DOC, "methods": [method], "training": {**DOC["training"], **training}}
    scenario = parse_scenario(doc, tmp_path)
    worker = CellWorker(scenario, tmp_path / "cache", torch.device("cpu"), progress=False)
    (cell,) = expand(scenario)
    with pytest.raises(TrainingDiverged) as info:
        worker.trained(cell)
    assert isinstance(info.value, WmbenchError) and "\n" not in str(info.value)
    assert "small_cnn/digits" in str(info.value) and "seed0" in str(info.value)
    assert not worker.cache.has(cell.train_id)
    assert not list((tmp_path / "cache" / "models").glob("*/model.safetensors")) if (tmp_path / "cache" / "models").exists() else True
