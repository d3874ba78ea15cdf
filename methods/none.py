"""The unwatermarked reference: plain training, detection with a WaterMAS-style key it never wrote."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wmbench.api import Carriers, Detection, Key, Method, detect_only
from wmbench.data import DataBundle
from wmbench.image_mark import CarrierScope, carriers_of, detect_image, draw_key, extract_pixels, record_channel_norms
from wmbench.registry import METHODS


@METHODS.register("none")
@dataclass(frozen=True)
class NoWatermark(Method):
    """No watermark: plain training; detection with a WaterMAS-style key it never wrote.

    The key is drawn exactly as WaterMAS draws one (same fields, same RNG stream), but nothing is
    written: its detection rows measure the false-positive side."""

    n_carriers: int = 1024
    carriers_scope: CarrierScope = "weights"
    image: str | None = None
    align: bool = detect_only(False)

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        return draw_key(model, self.name, self.n_carriers, self.carriers_scope, self.image, rng)

    def finalize_key(self, model: nn.Module, key: Key) -> Key:
        return record_channel_norms(model, key)

    def extract(self, model: nn.Module, key: Key) -> Tensor:
        return extract_pixels(model, key, self.align)

    def detect(self, model: nn.Module, key: Key) -> Detection:
        return detect_image(model, key, self.align)

    def carriers(self, key: Key) -> Carriers:
        return carriers_of(key)
