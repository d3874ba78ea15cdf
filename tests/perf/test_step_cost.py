"""One WaterMAS training step against one plain step (target: at most 2.0x; two passes is the floor),
and WaterMAS with ``mas_every: 4`` (the perturbed pass on one step in four: about 1.25x expected).

Run: ``pytest tests/perf/test_step_cost.py -m perf``; each model and device is one benchmark
group, so the table's relative column reads as the cost ratio to the plain step."""

from __future__ import annotations

import pytest
from bench_setup import DEVICES, bench_training_step

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("step_name", ["plain", "watermas", "watermas-every4"])
def test_training_step(benchmark, step_name: str, model_name: str, device_name: str) -> None:
    rounds = 20 if model_name == "small_cnn" or device_name == "cuda" else 8  # a multiple of 4: whole mas_every cycles
    method, args = ("watermas", {"mas_every": 4}) if step_name == "watermas-every4" else (step_name, None)
    bench_training_step(benchmark, method, model_name, device_name, rounds, args)
