"""Lookahead weight averaging (Zhang et al. 2019, arXiv 1907.08610) in the form airbench uses it
(Jordan 2024, arXiv 2404.00498), re-implemented from its description: every ``PERIOD`` optimiser
steps the slow copy moves towards the model's weights, ``slow <- decay * slow + (1 - decay) * fast``,
and the model is reset to the slow copy; ``decay`` grows as ``BASE_DECAY * (step / total) ** 3``, so
early training is not averaged at all and late training strongly. After the last step the model
takes the slow weights.

Float parameters and float buffers (BatchNorm statistics) are averaged; integer buffers are left
alone. A weight that never changes (a WaterMAS or Tartaglione carrier) stays bit-identical: the
update moves it by ``(1 - decay) * (fast - slow)``, which is exactly 0 when the two are equal.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PERIOD = 5  # optimiser steps between two averaging steps
BASE_DECAY = 0.95**PERIOD  # the slow copy's weight at the end of training


class Lookahead:
    """The slow copy of ``model``'s float state for a fit of ``total`` optimiser steps."""

    def __init__(self, model: nn.Module, total: int) -> None:
        self.total = max(total, 1)
        self.slow: dict[str, Tensor] = {k: v.detach().clone() for k, v in self._floats(model).items()}

    @staticmethod
    def _floats(model: nn.Module) -> dict[str, Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @property
    def state(self) -> dict[str, Tensor]:
        """The slow tensors by name, for an epoch checkpoint to save and restore in place."""
        return {f"lookahead/{k}": v for k, v in self.slow.items()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Call after optimiser step ``step`` (1-based, counted over the whole fit)."""
        if step % PERIOD == 0:
            self._sync(model, BASE_DECAY * (min(step, self.total) / self.total) ** 3)

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        """Give the model the slow weights (after the fit's last step)."""
        self._sync(model, 1.0)

    def _sync(self, model: nn.Module, decay: float) -> None:
        for name, fast in self._floats(model).items():
            slow = self.slow[name]
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)
