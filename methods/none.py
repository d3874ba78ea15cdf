"""The unwatermarked reference: plain training, detection with a WaterMAS-style key it never wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from wmbench.api import Key, Method, bounded, detect_only
from wmbench.data import DataBundle
from wmbench.image_mark import CarrierScope, ImageMarkDetection, draw_key
from wmbench.registry import METHODS


@METHODS.register("none")
@dataclass(frozen=True)
class NoWatermark(ImageMarkDetection, Method):
    """No watermark: plain training; detection with a WaterMAS-style key it never wrote.

    The key is drawn exactly as WaterMAS draws one (same fields, same RNG stream, live weights
    only), but nothing is
    written: its detection rows measure the false-positive side."""

    version: ClassVar[str] = "2"  # 2: carriers drawn among live weights only (wmbench.liveness)
    resumable: ClassVar[bool] = True  # plain steps
    # Plain training whatever the key: one unwatermarked model per seed serves every key size
    # (the unwatermarked arm at each N of Table 4 is the same model read at other positions).
    key_only_args: ClassVar[frozenset[str]] = frozenset({"n_carriers", "carriers_scope", "image"})

    n_carriers: int = bounded(1024, ge=3)
    carriers_scope: CarrierScope = "weights"
    image: str | None = None
    align: bool = detect_only(False)

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        return draw_key(model, self.name, self.n_carriers, self.carriers_scope, self.image, rng, data.train_x.shape[1:])

