"""Tondi, Costanzo and Barni (arXiv 2208.10973): bits in the signs of fixed, keyed weights.

Before training, ``bits * spread`` weights at secret random positions are set to values whose
sign carries a bit (each bit repeated on ``spread`` carriers, modulated by a keyed +-1 sequence)
and whose magnitude is drawn from an optimised distribution: as large as possible while staying
inside the distribution of the tensor's own weights. The carriers stay frozen during training.
Detection reads the signs back. The closest relative of WaterMAS (frozen keyed carriers) without
the sharpness-aware step: the control that tells what MAS adds.
"""

from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor, nn

from wmbench.api import Carriers, Detection, Key, LossFn, Method, StepFn, bounded, plain_step
from wmbench.data import DataBundle
from wmbench.image_mark import CarrierScope, CarrierSet, candidate_params, carriers_of, sample_positions
from wmbench.metrics import binomial_log10_sf
from wmbench.methods.watermas import CarrierMasks
from wmbench.registry import METHODS


def carrier_signs(key: Key) -> Tensor:
    """The sign each carrier must have: (2 b - 1) * (2 pn - 1), carrier j holding bit j mod bits."""
    t = key.tensors
    bits = t["bits"].long()[torch.arange(len(t["pn"])) % len(t["bits"])]
    return (2.0 * bits - 1.0) * (2.0 * t["pn"].float() - 1.0)


def magnitude_quantiles(values: Tensor, u: Tensor, rng: torch.Generator, sample: int = 1 << 16) -> Tensor:
    """The ``u``-quantiles (nearest rank) of ``values``, estimated from at most ``sample`` of them."""
    if len(values) > sample:
        values = values[torch.randint(len(values), (sample,), generator=rng)]
    ordered = torch.sort(values).values
    return ordered[(u * (len(ordered) - 1)).round().long()]


def frozen_step(model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, carriers: CarrierMasks) -> Tensor:
    """A plain step, then the carriers written back bit for bit (no gradient, momentum or decay moves them)."""
    loss = plain_step(model, batch, loss_fn, optimizer)
    carriers.restore()
    return loss


@METHODS.register("fixed_embedding")
@dataclass(frozen=True)
class FixedEmbedding(Method):
    """Tondi et al. (2022): bits in the signs of keyed weights frozen at optimised magnitudes.

    Defaults and their sources:

    - ``bits=256``: [wmbench choice] as Uchida and Li (the paper studies payloads up to thousands).
    - ``spread=4``: each bit is repeated on 4 carriers (the paper spreads a bit over several fixed
      weights; the repetition factor is the payload/robustness knob); 1024 carriers, as WaterMAS.
    - Positions: uniform over the Conv/Linear weights (``carriers_scope``), a tensor chosen with
      probability proportional to its size (as WaterMAS); signs modulated by a keyed +-1 sequence.
    - Magnitudes [wmbench choice]: the paper derives the carriers' value distribution by an
      optimisation (as large as possible, to survive fine-tuning and pruning, yet indistinguishable
      from the other weights). Its closed-form stand-in here: the magnitude of a carrier is the
      u-quantile of its tensor's |w| at initialisation (estimated on at most 65536 of them) with
      u ~ U(``quantile``, 1): the values stay
      inside the tensor's own range (no outlier betrays them) while their mean amplitude is pushed
      towards the top of it. ``quantile=0.5``: the upper half (magnitude pruning up to 50% never
      reaches a carrier at embedding time).
    - Frozen: rewritten after every optimiser step, as WaterMAS's carriers.

    Detection: statistic the fraction of carriers whose demodulated sign matches (a zero weight
    never matches); p-value P[Binomial(N, 1/2) >= matches] (an unrelated model's signs are fair
    coins). ``extract`` gives the bits decoded by majority over each bit's carriers.
    """

    statistic: ClassVar[str] = "bit_accuracy"
    resumable: ClassVar[bool] = True  # its step keeps no state between calls

    bits: int = bounded(256, ge=1)
    spread: int = bounded(4, ge=1)
    quantile: float = bounded(0.5, ge=0, lt=1)
    carriers_scope: CarrierScope = "weights"

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        params = candidate_params(model, self.carriers_scope)
        names = list(params)
        n = self.bits * self.spread
        param_id, flat_idx = sample_positions([p.numel() for p in params.values()], n, rng)
        key = Key(
            self.name,
            {
                "param_id": param_id,
                "flat_idx": flat_idx,
                "bits": torch.randint(0, 2, (self.bits,), generator=rng).to(torch.uint8),
                "pn": torch.randint(0, 2, (n,), generator=rng).to(torch.uint8),
            },
            {"params": names, "shapes": [list(params[k].shape) for k in names], "spread": self.spread},
        )
        u = self.quantile + (1.0 - self.quantile) * torch.rand(n, generator=rng, dtype=torch.float64)
        magnitude = torch.empty(n)
        for pid, p in enumerate(params.values()):
            mask = param_id == pid
            if bool(mask.any()):
                magnitude[mask] = magnitude_quantiles(p.detach().abs().float().cpu().flatten(), u[mask], rng)
        key.tensors["values"] = carrier_signs(key) * magnitude.clamp_min(1e-6)
        carriers = CarrierSet.bind(model, key)
        carriers.write(carriers.per_param(key.tensors["values"]))
        return key

    def step_fn(self, model: nn.Module, key: Key) -> StepFn:
        carriers = CarrierMasks.build(CarrierSet.bind(model, key), key.tensors["values"])
        return lambda m, b, f, o: frozen_step(m, b, f, o, carriers)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, key: Key) -> Tensor:
        return self.step_fn(model, key)(model, batch, loss_fn, optimizer)

    def agreement(self, model: nn.Module, key: Key) -> Tensor:
        """Per carrier: +1 where its sign is the one written, -1 where flipped, 0 where zero."""
        values = CarrierSet.bind(model, key).read(len(key.tensors["flat_idx"]))
        return torch.sign(values) * carrier_signs(key)

    def extract(self, model: nn.Module, key: Key) -> Tensor:
        agree = self.agreement(model, key)
        n_bits = len(key.tensors["bits"])
        votes = torch.zeros(n_bits).index_add_(0, torch.arange(len(agree)) % n_bits, agree)
        bits = key.tensors["bits"].float()
        return torch.where(votes > 0, bits, 1.0 - bits)  # ties (all zeroed) read as errors

    def detect(self, model: nn.Module, key: Key) -> Detection:
        agree = self.agreement(model, key)
        matches = int((agree > 0).sum())
        return Detection(matches / len(agree), float(stats.binom.sf(matches - 1, len(agree), 0.5)), binomial_log10_sf(matches, len(agree)))

    def carriers(self, key: Key) -> Carriers:
        return carriers_of(key)
