"""TATTOOED (Pagnotta et al., ACSAC 2024): CDMA spread-spectrum watermark added after training.

Each bit b_i (as +-1) gets a secret pseudo-random spreading code c_i in {-1, +1}^n over n chosen
weights; the trained weights receive the sum of the codes modulated by the bits, at low power:
w <- w + gamma * std(w's tensor) * sum_i b_i c_i / sqrt(bits). Detection despreads blindly (no
original weights needed): y_i = sum_j c_ij w_j / std_j, bit i read as sign(y_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from wmbench.api import Carriers, Detection, Key, Method, bounded, keyed_tensor, plain_step
from wmbench.data import DataBundle
from wmbench.metrics import bit_detection
from wmbench.models import weight_params
from wmbench.errors import ConfigError
from wmbench.registry import METHODS


@dataclass
class Spread:
    """The key's chosen weights bound to one model: the tensors, their flat indices and their std
    at embedding (the power unit), concatenated in the key's order."""

    params: list[nn.Parameter]
    indices: list[Tensor]
    scale: Tensor  # per chosen weight, its tensor's std recorded in the key

    @classmethod
    def bind(cls, model: nn.Module, key: Key) -> "Spread":
        named = dict(model.named_parameters())
        params, indices = [], []
        for name, shape in zip(key.meta["params"], key.meta["shapes"]):
            p = keyed_tensor(named, name, shape)
            params.append(p)
        for p, idx in zip(params, positions(key)):
            indices.append(idx)
        scale = torch.cat([torch.full((len(i),), float(s)) for i, s in zip(indices, key.tensors["stds"])])
        return cls(params, indices, scale)

    def read(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1)[i.to(p.device)].double().cpu() for p, i in zip(self.params, self.indices)])

    @torch.no_grad()
    def add(self, signal: Tensor) -> None:
        start = 0
        for p, i in zip(self.params, self.indices):
            part = signal[start : start + len(i)]
            p.view(-1)[i.to(p.device)] += part.to(p.device, p.dtype)
            start += len(i)


def positions(key: Key) -> list[Tensor]:
    """Per tensor of the key, the flat indices of its chosen weights: each weight chosen with
    probability ``fraction`` by a generator seeded from the key (all of them at fraction 1)."""
    g = torch.Generator().manual_seed(int(key.meta["seed"]))
    fraction = float(key.meta["fraction"])
    out = []
    for shape in key.meta["shapes"]:
        n = math.prod(shape)
        out.append(torch.arange(n) if fraction >= 1.0 else (torch.rand(n, generator=g) < fraction).nonzero().flatten())
    return out


def codes(key: Key, n: int) -> Iterator[Tensor]:
    """The spreading codes c_i in {-1, +1}^n (float64), one per bit, from the key's seed."""
    g = torch.Generator().manual_seed(int(key.meta["seed"]) + 1)
    for _ in range(len(key.tensors["bits"])):
        yield torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2.0 - 1.0


@METHODS.register("tattooed")
@dataclass(frozen=True)
class Tattooed(Method):
    """TATTOOED (ACSAC 2024): CDMA spread-spectrum added to the weights after training.

    Defaults and their sources:

    - Embedded after training, into the trained weights (the paper's main setting); no
      fine-tuning afterwards.
    - ``fraction=1.0`` [wmbench choice]: the paper spreads over a chosen ratio of the parameters;
      on the small models of a CPU benchmark every Conv/Linear weight is needed for processing
      gain (the SNR of a bit grows with sqrt(n / bits)).
    - ``bits=64``: [wmbench choice] the paper's payloads are larger, protected by an LDPC code on
      models with millions of weights; no channel code here, and a payload small smaller models carry.
    - ``gamma=0.1`` [wmbench choice]: the paper's power is one absolute gamma for the whole model;
      here the signal's per-weight std is gamma times its own tensor's std (one setting for every
      layer and model), and despreading divides each weight by that std, so that large tensors do
      not drown the others.
    - Codes: +-1 from a generator seeded by the key (the paper's PRNG spreading codes).

    Detection: b_i = [y_i > 0]; statistic bit accuracy, p-value P[Binomial(bits, 1/2) >= matches]
    (despreading an unrelated model gives signs independent of the bits). ``carriers`` are all the
    chosen weights: a key-leak overwrite of part of them removes only part of the signal.
    """

    statistic: ClassVar[str] = "bit_accuracy"
    resumable: ClassVar[bool] = True  # plain steps; the mark is added after training

    bits: int = bounded(64, ge=1)
    gamma: float = bounded(0.1, gt=0)
    fraction: float = bounded(1.0, gt=0, le=1)

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        """Draw the key and add the spread signal to ``model``'s weights as they are now."""
        params = weight_params(model)
        names = list(params)
        key = Key(
            self.name,
            {
                "bits": torch.randint(0, 2, (self.bits,), generator=rng).to(torch.uint8),
                "stds": torch.tensor([float(p.detach().std()) if p.numel() > 1 else 1.0 for p in params.values()]).clamp_min(1e-12),
            },
            {"params": names, "shapes": [list(params[k].shape) for k in names], "fraction": self.fraction,
             "seed": int(torch.randint(0, 2**62, (1,), generator=rng))},
        )
        chips = sum(len(p) for p in positions(key))
        if chips < self.bits:
            raise ConfigError("bits", f"{self.bits} bits spread over {chips} weights (fraction {self.fraction:g} of the model's "
                              f"{sum(p.numel() for p in params.values())}): the codes need at least one weight per bit (fewer bits or a larger fraction)")
        spread = Spread.bind(model, key)
        signal = torch.zeros(len(spread.scale), dtype=torch.float64)
        sign = 2.0 * key.tensors["bits"].double() - 1.0
        for b, c in zip(sign, codes(key, len(signal))):
            signal += b * c
        spread.add(self.gamma * spread.scale.double() * signal / math.sqrt(self.bits))
        return key

    def embed(self, model: nn.Module, trainer: Any, rng: torch.Generator) -> Key:
        model.to(trainer.device)
        trainer.fit(model, plain_step)
        return self.finalize_key(model, self.keygen(model, trainer.data, rng))

    def despread(self, model: nn.Module, key: Key) -> Tensor:
        """y_i = sum_j c_ij w_j / std_j for each bit (float64)."""
        spread = Spread.bind(model, key)
        w = spread.read() / spread.scale.double()
        return torch.stack([c @ w for c in codes(key, len(w))])

    def extract(self, model: nn.Module, key: Key) -> Tensor:
        return (self.despread(model, key) > 0).float()

    def detect(self, model: nn.Module, key: Key) -> Detection:
        return bit_detection(self.extract(model, key), key.tensors["bits"])

    def carriers(self, key: Key) -> Carriers:
        return dict(zip(key.meta["params"], positions(key)))
