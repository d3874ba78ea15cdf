"""An image written into weights at secret random positions, read back by Pearson correlation.

Shared by WaterMAS, Tartaglione and the unwatermarked reference. The key holds, per carrier:
``param_id`` (into ``meta['params']``), ``flat_idx`` (into that tensor viewed flat), ``pixels``
(the inserted image, 0..255), the mapping's ``mu``/``sigma`` and, once training is over,
``channel_norm`` (the L2 norm of the carrier's output channel, for aligned detection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from wmbench.api import Carriers, Detection, Key
from wmbench.errors import ConfigError, NotApplicable
from wmbench.metrics import pearson_detection
from wmbench.models import weight_params

CarrierScope = Literal["weights", "all"]


def candidate_params(model: nn.Module, scope: CarrierScope) -> dict[str, nn.Parameter]:
    """Tensors that may carry the mark: Conv/Linear weights, or every parameter (``all``)."""
    if scope == "all":
        return dict(model.named_parameters())
    return weight_params(model)


def load_image(path: str | None, n: int) -> Tensor:
    """Grayscale pixels (0..255, float) of ``path`` (default: the shipped image), resized to a
    square of side ceil(sqrt(n)) and cut to its first ``n`` pixels in row-major order."""
    from PIL import Image, UnidentifiedImageError

    source = Path(path).expanduser() if path else resources.files("wmbench") / "assets" / "mark.png"
    side = math.isqrt(n - 1) + 1 if n > 0 else 0
    try:
        with Image.open(source) as img:  # type: ignore[arg-type]
            gray = img.convert("L").resize((side, side), Image.BILINEAR)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ConfigError("image", f"cannot read image {source}: {exc}") from None
    return torch.from_numpy(np.asarray(gray, dtype=np.float32).reshape(-1)[:n].copy())


def sample_positions(sizes: list[int], n: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` distinct positions drawn uniformly over all entries of tensors of ``sizes`` (so a
    tensor is chosen with probability proportional to its size); returns (param_id, flat_idx)."""
    total = sum(sizes)
    if n > total:
        raise ConfigError("n_carriers", f"{n} carriers requested but the model has only {total} candidate weights")
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < n:  # draw with replacement, keep first occurrences in order, top up
        draw = torch.randint(total, (2 * (n - len(chosen)) + 16,), generator=rng).numpy()
        merged = np.concatenate([chosen, draw])
        _, first = np.unique(merged, return_index=True)
        chosen = merged[np.sort(first)][:n]
    chosen = torch.from_numpy(chosen)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    param_id = torch.searchsorted(offsets, chosen, right=True) - 1
    return param_id, chosen - offsets[param_id]


def draw_key(model: nn.Module, method: str, n: int, scope: CarrierScope, image: str | None, rng: torch.Generator) -> Key:
    """Carrier positions, the image and its eq. 5 mapping (mu, sigma of each carrier's tensor now)."""
    params = candidate_params(model, scope)
    names = list(params)
    param_id, flat_idx = sample_positions([p.numel() for p in params.values()], n, rng)
    stats = torch.tensor([[float(p.detach().mean()), float(p.detach().std()) if p.numel() > 1 else 1.0] for p in params.values()])
    return Key(
        method,
        {
            "param_id": param_id,
            "flat_idx": flat_idx,
            "pixels": load_image(image, n),
            "mu": stats[param_id, 0].float(),
            "sigma": stats[param_id, 1].clamp_min(1e-8).float(),
        },
        {"params": names, "shapes": [list(params[k].shape) for k in names]},
    )


def pixels_to_weights(key: Key, scale: float = 1.0) -> Tensor:
    """Eq. 5 [wmbench choice]: x = 2p/255 - 1, w = mu + sigma * scale * x."""
    t = key.tensors
    return t["mu"] + t["sigma"] * scale * (2.0 * t["pixels"] / 255.0 - 1.0)


@dataclass
class CarrierSet:
    """The key's carriers bound to one model's parameter objects, grouped by tensor."""

    params: list[nn.Parameter]
    indices: list[Tensor]  # flat indices into each param
    slots: list[Tensor]  # positions of those carriers in the key's order

    @classmethod
    def bind(cls, model: nn.Module, key: Key) -> "CarrierSet":
        named = dict(model.named_parameters())
        params, indices, slots = [], [], []
        param_id, flat_idx = key.tensors["param_id"], key.tensors["flat_idx"]
        for pid, (name, shape) in enumerate(zip(key.meta["params"], key.meta["shapes"])):
            mask = param_id == pid
            if not bool(mask.any()):
                continue
            p = named.get(name)
            if p is None or list(p.shape) != shape:
                found = "missing" if p is None else f"shape {list(p.shape)}"
                raise NotApplicable(f"key expects {name} of shape {shape}, model has {found}")
            params.append(p)
            indices.append(flat_idx[mask].to(p.device))
            slots.append(mask.nonzero().flatten())
        return cls(params, indices, slots)

    def read(self, n: int) -> Tensor:
        """Current carrier values, in the key's order (on the CPU)."""
        out = torch.empty(n)
        for p, idx, slot in zip(self.params, self.indices, self.slots):
            out[slot] = p.detach().reshape(-1)[idx].float().cpu()
        return out

    def per_param(self, values: Tensor) -> list[Tensor]:
        """``values`` (in the key's order) split per tensor, on each tensor's device and dtype."""
        return [values[slot].to(p.device, p.dtype) for p, slot in zip(self.params, self.slots)]

    @torch.no_grad()
    def write(self, values: list[Tensor]) -> None:
        """Set the carriers to per-tensor ``values`` (from ``per_param``), bit for bit."""
        for p, idx, v in zip(self.params, self.indices, values):
            p.data.view(-1)[idx] = v

    def channel_norms(self, n: int) -> Tensor:
        """L2 norm of each carrier's output channel (row of its tensor; |w| for 1-D tensors)."""
        out = torch.empty(n)
        for p, idx, slot in zip(self.params, self.indices, self.slots):
            rows = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(-1, 1)
            per_row = rows.float().norm(dim=1)
            out[slot] = per_row[idx // rows.shape[1]].cpu()
        return out


def carriers_of(key: Key) -> Carriers:
    """Parameter name -> flat indices of the carriers."""
    out: Carriers = {}
    for pid, name in enumerate(key.meta["params"]):
        idx = key.tensors["flat_idx"][key.tensors["param_id"] == pid]
        if len(idx):
            out[name] = idx
    return out


def record_channel_norms(model: nn.Module, key: Key) -> Key:
    """The key with each carrier's output-channel norm as it is now (end of embedding)."""
    n = len(key.tensors["flat_idx"])
    key.tensors["channel_norm"] = CarrierSet.bind(model, key).channel_norms(n)
    return key


def extract_pixels(model: nn.Module, key: Key, align: bool = False, scale: float = 1.0) -> Tensor:
    """Invert eq. 5 on the carriers; with ``align``, first undo per-channel rescaling by dividing
    each carrier by (its channel's norm now / the norm recorded at embedding)."""
    n = len(key.tensors["flat_idx"])
    carriers = CarrierSet.bind(model, key)
    w = carriers.read(n)
    if align:
        if "channel_norm" not in key.tensors:
            raise NotApplicable("key has no recorded channel norms (align needs a key from wmbench >= 0.1)")
        ratio = carriers.channel_norms(n) / key.tensors["channel_norm"].clamp_min(1e-12)
        w = w / ratio.clamp_min(1e-12)
    t = key.tensors
    return 255.0 * ((w - t["mu"]) / (t["sigma"] * scale) + 1.0) / 2.0


def detect_image(model: nn.Module, key: Key, align: bool = False, scale: float = 1.0) -> Detection:
    """Pearson r between the recovered and the inserted image, with its p-value."""
    return pearson_detection(extract_pixels(model, key, align, scale), key.tensors["pixels"])
