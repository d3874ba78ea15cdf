"""One training step of each method added after the paper's baselines against one plain step.

Run: ``pytest tests/perf/test_more_methods_step_cost.py -m perf``; one benchmark group per model
and device, so the relative column reads as the cost ratio to the plain step. Each step is the
closure the method's ``embed`` binds (``step_fn``), on a freshly initialised model. What a step
does not show: tattooed trains plainly and adds its signal once after training (a few despreading
passes); hufunet's step is a plain one, plus, once per epoch, ``retune_steps`` autoencoder steps
(and ``ae_steps`` once at key generation); deepsigns adds a centre loss and a projection of the
batch's class means (no extra pass); fixed_embedding a carrier rewrite; greedy_residuals a
top-k and a hinge on one layer."""

from __future__ import annotations

import pytest
from bench_setup import DEVICES, bench_training_step

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("step_name", ["plain", "fixed_embedding", "hufunet", "tattooed", "greedy_residuals", "deepsigns"])
def test_more_methods_step(benchmark, step_name: str, model_name: str, device_name: str) -> None:
    rounds = 20 if model_name == "small_cnn" or device_name == "cuda" else 6
    bench_training_step(benchmark, step_name, model_name, device_name, rounds)
