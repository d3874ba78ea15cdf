"""The reference throughput a curve records beside its training minutes."""

from __future__ import annotations

import torch

from wmbench.machine_speed import reference_images_per_s


def test_probe_measures_a_positive_rate_and_leaves_the_random_state_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    speed = reference_images_per_s(torch.device("cpu"), seconds=0.5)
    assert speed > 0
    assert torch.equal(torch.get_rng_state(), state)
