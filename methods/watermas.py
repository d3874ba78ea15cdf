"""WaterMAS (De Sousa Trias et al., ICPR 2024, arXiv 2409.03902): sharpness-aware maximisation.

An image is written into ``n_carriers`` live weights drawn at random over the whole model (eq. 5); the
carriers stay frozen, bit for bit, while the other weights are trained with the MAS step, which
minimises the loss and maximises it at a step of radius ``rho * sigma_bar * sqrt(N)`` from the
carriers (``perturbation_radius``), making the loss landscape around them sharp: altering the
carriers then costs task performance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from wmbench.api import Key, LossFn, Method, StatefulStep, StepFn, bounded, detect_only
from wmbench.data import DataBundle
from wmbench.image_mark import (
    CarrierScope,
    CarrierSet,
    ImageMarkDetection,
    draw_key,
    pixels_to_weights,
)
from wmbench.registry import METHODS
from wmbench.train import untouched_bn_statistics


@dataclass
class CarrierMasks:
    """The carriers as dense per-tensor masks, so that each phase of a MAS step is a few fused
    multi-tensor kernels rather than one small indexing kernel per tensor (GPU launch overhead)."""

    params: list[nn.Parameter]
    is_carrier: list[Tensor]  # 1 at carriers, 0 elsewhere
    keep: list[Tensor]  # 0 at carriers, 1 elsewhere
    fill: list[Tensor]  # the carrier values at carriers, 0 elsewhere

    @classmethod
    def build(cls, carriers: CarrierSet, values: Tensor) -> "CarrierMasks":
        is_carrier, keep, fill = [], [], []
        for p, idx, v in zip(carriers.params, carriers.indices, carriers.per_param(values)):
            mask = torch.zeros_like(p)
            mask.view(-1)[idx] = 1.0
            dense = torch.zeros_like(p)
            dense.view(-1)[idx] = v
            is_carrier.append(mask)
            keep.append(1.0 - mask)
            fill.append(dense)
        return cls(list(carriers.params), is_carrier, keep, fill)

    def with_grad(self) -> list[int]:
        """The positions in ``params`` of the tensors that have a gradient now."""
        return [i for i, p in enumerate(self.params) if p.grad is not None]

    @torch.no_grad()
    def hold_gradients(self) -> None:
        """Zero the carriers' gradients (the tensors that have one), so the step leaves them alone."""
        moved = self.with_grad()
        if moved:
            torch._foreach_mul_([self.params[i].grad for i in moved], [self.keep[i] for i in moved])  # type: ignore[misc]

    @torch.no_grad()
    def restore(self) -> None:
        """Carriers back to their values bit for bit (w * 0 + v); the other weights keep theirs."""
        torch._foreach_mul_(self.params, self.keep)
        torch._foreach_add_(self.params, self.fill)


def mas_step(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    carriers: CarrierMasks,
    radius: float,
    lam: float,
) -> Tensor:
    """One MAS update (REFERENCE.md's reading of eqs. 3-4); carriers end bit-identical.

    1. g1 = grad L(theta).  2. theta~_w = theta_w - radius g1_w / ||g1_w||.  3. g2 = grad L(theta~),
    BN running statistics untouched.  4. restore theta_w; step theta_n along g1 - lam g2.
    """
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    g1 = [p.grad for p in params]
    moved = carriers.with_grad()  # a frozen or unused tensor has no gradient: its carriers stay put
    with torch.no_grad():
        if moved:
            step = torch._foreach_mul([carriers.params[i].grad for i in moved], [carriers.is_carrier[i] for i in moved])  # type: ignore[misc]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(step)))
            torch._foreach_mul_(step, -radius / (norm + 1e-12))
            torch._foreach_add_([carriers.params[i] for i in moved], step)
    for p in params:
        p.grad = None  # g1 is kept aside; the second pass writes fresh gradients
    with untouched_bn_statistics(model):
        loss_fn(model(inputs), targets).backward()
    with torch.no_grad():
        carriers.restore()
        grads = [p.grad for p in params]
        torch._foreach_mul_(grads, -lam)  # type: ignore[arg-type]
        torch._foreach_add_(grads, g1)  # type: ignore[arg-type]
        carriers.hold_gradients()
    optimizer.step()
    carriers.restore()  # undo what weight decay and momentum did to the carriers
    return loss.detach()


def frozen_step(model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, carriers: CarrierMasks) -> Tensor:
    """``mas_step`` with lam = 0 (or radius 0) in one pass: the same update, carriers frozen, at the
    cost of a plain step (the control arm "frozen carriers without MAS")."""
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    with torch.no_grad():
        carriers.hold_gradients()
    optimizer.step()
    carriers.restore()
    return loss.detach()


def perturbation_radius(rho: float, key: Key) -> float:
    """The L2 radius of MAS's carrier perturbation: ``rho * sigma_bar * sqrt(N)``, with N the carrier
    count and sigma_bar the mean, over carriers, of the std of each carrier's tensor at
    initialisation (the key's ``sigma``). The root-mean-square step per carrier is then
    ``rho * sigma_bar``: ``rho`` is in units of the weights' own spread, whatever N or the model."""
    sigma = key.tensors["sigma"].double()
    return float(rho * sigma.mean() * math.sqrt(len(sigma)))


@METHODS.register("watermas")
@dataclass(frozen=True)
class WaterMAS(ImageMarkDetection, Method):
    """WaterMAS: an image in frozen random carriers, trained with sharpness-aware maximisation.

    The REFERENCE.md readings [wmbench choice]:
    - eq. 5: x = 2p/255 - 1, w = mu + sigma x, with mu and sigma of each carrier's own tensor at
      initialisation (so carriers look like the weights around them);
    - MAS: the perturbation moves carriers only, down the gradient; the second pass leaves the
      BatchNorm running statistics untouched (as SAM implementations do);
    - carriers are rewritten after every optimiser step, so momentum and weight decay never move them.

    ``rho`` is scale-free: the carrier perturbation has L2 radius rho * sigma_bar * sqrt(N)
    (``perturbation_radius``), a root-mean-square step of rho * sigma_bar per carrier, sigma_bar
    being the mean std of the carriers' tensors at initialisation; one value means the same step
    for 1024 or 16384 carriers and on any model. Carriers are drawn among the weights that can
    change the output at the data's input size (``wmbench.liveness``).

    Defaults rho=0.6, lam=0.1: chosen by scenarios/watermas_grid.yaml (digits / small_cnn, 4 seeds;
    README, "Choosing WaterMAS defaults") with the rule: among settings whose mean imperceptibility
    is within 2 points, the largest mean error_delta when all carriers are overwritten (key_leak).
    (rho=0.6 there is the earlier absolute radius 1.0 at N=1024.) lam must stay below 1 (at lam=1
    the task gradient cancels). ``align`` only changes detection: it undoes per-channel rescaling
    of the carriers' tensors (wmbench.image_mark.extract_pixels).
    """

    resumable: ClassVar[bool] = True  # every_kth keeps its step count in a StatefulStep

    n_carriers: int = bounded(1024, ge=3)
    rho: float = bounded(0.6, ge=0)
    lam: float = bounded(0.1, ge=0)
    mas_every: int = bounded(1, ge=1, added=True)
    carriers_scope: CarrierScope = "weights"
    image: str | None = None
    align: bool = detect_only(False)

    @property
    def version(self) -> str:  # type: ignore[override]
        """2: scale-free rho, carriers drawn among live weights only; 3 with ``carriers_scope: all``:
        tensors that are constant when the key is drawn (BatchNorm's weights and biases) carry none
        (their sigma of 0 mapped every pixel to the same float). A property, so that the default
        scope keeps its stored trainings."""
        return "3" if self.carriers_scope == "all" else "2"

    def __post_init__(self) -> None:
        if self.n_carriers < 3:
            raise ValueError(f"n_carriers must be >= 3, got {self.n_carriers}")
        if self.rho < 0:
            raise ValueError(f"rho must be >= 0, got {self.rho}")

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        key = draw_key(model, self.name, self.n_carriers, self.carriers_scope, self.image, rng, data.train_x.shape[1:], varying_only=True)
        key.tensors["values"] = pixels_to_weights(key)
        carriers = CarrierSet.bind(model, key)
        carriers.write(carriers.per_param(key.tensors["values"]))
        return key

    def step_fn(self, model: nn.Module, key: Key) -> StepFn:
        """The MAS step bound to ``model``: the carrier masks are built once per training."""
        carriers = CarrierMasks.build(CarrierSet.bind(model, key), key.tensors["values"])
        radius = perturbation_radius(self.rho, key)
        if self.lam == 0 or radius == 0:  # the perturbed pass cannot change the update: skip it
            return lambda m, b, f, o: frozen_step(m, b, f, o, carriers)
        if self.mas_every == 1:
            return lambda m, b, f, o: mas_step(m, b, f, o, carriers, radius, self.lam)
        steps = torch.zeros((), dtype=torch.int64)

        def every_kth(m: nn.Module, b: tuple[Tensor, Tensor], f: LossFn, o: torch.optim.Optimizer) -> Tensor:
            steps.add_(1)
            if (int(steps) - 1) % self.mas_every == 0:
                return mas_step(m, b, f, o, carriers, radius, self.lam)
            return frozen_step(m, b, f, o, carriers)

        return StatefulStep(every_kth, {"steps": steps})

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, key: Key) -> Tensor:
        return self.step_fn(model, key)(model, batch, loss_fn, optimizer)
