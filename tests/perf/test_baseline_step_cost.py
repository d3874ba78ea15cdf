"""One training step of each baseline against one plain step, on resnet18 with CIFAR-sized batches.

Run: ``pytest tests/perf/test_baseline_step_cost.py -m perf``; one benchmark group per device, so
the table's relative column reads as the cost ratio to the plain step. Each method's step is the
closure its ``embed`` binds (``step_fn``), built on a freshly initialised model: Uchida adds a
projection regulariser, Tartaglione 1 + R passes (R = 2), Li a sign projection after a plain step
(the fine-tuning step; its plain training epochs cost exactly a plain step)."""

from __future__ import annotations

import pytest
from bench_setup import DEVICES, bench_training_step

pytestmark = pytest.mark.perf


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("step_name", ["plain", "uchida", "tartaglione", "li_sign"])
def test_baseline_step(benchmark, step_name: str, device_name: str) -> None:
    bench_training_step(benchmark, step_name, "resnet18", device_name, rounds=20 if device_name == "cuda" else 6)
