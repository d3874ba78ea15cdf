"""Tartaglione et al. (ICPR 2020), "Delving in the loss landscape to embed robust watermarks".

An image is written into weights drawn at random over every parameter tensor and frozen; at each
batch, R replicas of the model whose carriers get Gaussian noise take one gradient-ascent step, and
the centre moves by -lam * mask * mean(replicas) (mask: 1 off the carriers). Detection: Pearson r
between the recovered and the inserted image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class ReplicaState:
    """What one bound step reuses: the carriers, their values, the centre-update buffers, the noise RNG."""

    params: list[nn.Parameter]
    buffers: list[Tensor]
    carriers: CarrierSet
    values: list[Tensor]
    generator: torch.Generator
    sizes: list[int] = field(init=False)
    total: int = field(init=False)
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = [len(v) for v in self.values]
        self.total = sum(self.sizes)
        first = self.values[0] if self.values else torch.zeros(0)
        self.device, self.dtype = first.device, first.dtype


def tartaglione_step(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    state: ReplicaState,
    replicas: int,
    noise_std: float,
    lam: float,
    replica_lr: float,
) -> Tensor:
    """One step of the reference loop (EIDOSLAB ``train``), replicas evaluated in place.

    Replica r = theta + eps_r (on the carriers) + replica_lr * grad L(theta + eps_r), its
    gradient-ascent step; the centre takes its optimiser step with the carriers' gradients zeroed,
    then moves by -lam * (theta + replica_lr * mean_r grad L(theta + eps_r)) off the carriers.
    The replicas' passes leave the BatchNorm running statistics alone (they were separate models
    in the reference); the carriers end bit-identical to their values.
    """
    inputs, targets = batch
    c = state.carriers
    optimizer.zero_grad(set_to_none=True)
    use_replicas = lam != 0.0 and replicas > 0
    if use_replicas:
        with untouched_bn_statistics(model):
            for _ in range(replicas):
                with torch.no_grad():  # one draw for all carriers, split into views per tensor
                    noise = torch.randn(state.total, generator=state.generator, device=state.device, dtype=state.dtype)
                    c.write(torch._foreach_add(state.values, noise.split(state.sizes), alpha=noise_std))
                loss_fn(model(inputs), targets).backward()
        c.write(state.values)
        with torch.no_grad():
            live = [(p, b) for p, b in zip(state.params, state.buffers) if p.grad is not None]
            params, buffers = [p for p, _ in live], [b for _, b in live]
            torch._foreach_copy_(buffers, params)
            torch._foreach_add_(buffers, [p.grad for p in params], alpha=replica_lr / replicas)  # type: ignore[misc]
        optimizer.zero_grad(set_to_none=False)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    with torch.no_grad():
        for p, idx in zip(c.params, c.indices):
            if p.grad is not None:
                p.grad.view(-1)[idx] = 0.0
    optimizer.step()
    if use_replicas:
        with torch.no_grad():
            torch._foreach_add_(params, buffers, alpha=-lam)
    c.write(state.values)  # the mask: carriers untouched by the centre update, weight decay, momentum
    return loss.detach()


@METHODS.register("tartaglione")
@dataclass(frozen=True)
class Tartaglione(ImageMarkDetection, Method):
    """Tartaglione's frozen-image watermark. Defaults and their sources:

    - ``n_carriers=1024``: [wmbench choice] as WaterMAS, for a like-for-like comparison (the
      reference embeds every pixel of an RGB image).
    - ``scale=1.0`` (SF): NNWTestbed TART (x = (2p/255 - 1) * SF); the EIDOSLAB script divides by
      SF=0.1 instead. Carriers are drawn over every parameter (``carriers_scope="all"``), a
      tensor being chosen with probability proportional to its size (both references); [wmbench
      choice] only among weights that can change the output at the data's input size
      (``wmbench.liveness``).
    - ``replicas=2``, ``noise_std=0.01``, ``lam=1e-5``, ``replica_lr=0.1``: NNWTestbed TART
      (EIDOSLAB: R=4, lam=1e-6, replica lr 1.0).
    - [wmbench choice] reading of "the centre moves by -lam * mask * mean(replicas)": literally
      the reference code's ``update_center``, i.e. the mean of the replicas' *weights* after their
      ascent step, so the centre also decays by lam * theta; the replicas start from the centre as
      it was before its own step (the reference copies them at the top of the batch). lam=0
      skips the replicas (as the reference does).
    - [wmbench choice] carriers are rewritten after every step, so weight decay and momentum never
      move them (the reference's optimiser still decayed them slightly).

    The noise stream is seeded from the key (``noise_seed``, drawn from the embedding RNG).
    ``training_step`` (unbound, not used by ``embed``) restarts that stream at every call.
    ``align`` (detection only): see WaterMAS.
    """

    version: ClassVar[str] = "2"  # 2: carriers drawn among live weights only (wmbench.liveness)
    resumable: ClassVar[bool] = True  # the noise generator is a StatefulStep's

    n_carriers: int = bounded(1024, ge=3)
    scale: float = bounded(1.0, gt=0)
    replicas: int = bounded(2, ge=0)
    noise_std: float = bounded(0.01, ge=0)
    lam: float = bounded(1e-5, ge=0)
    replica_lr: float = bounded(0.1, ge=0)
    carriers_scope: CarrierScope = "all"
    image: str | None = None
    align: bool = detect_only(False)

    def __post_init__(self) -> None:
        if self.n_carriers < 3:
            raise ValueError(f"n_carriers must be >= 3, got {self.n_carriers}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.replicas < 0 or self.noise_std < 0:
            raise ValueError("replicas and noise_std must be >= 0")

    def keygen(self, model: nn.Module, data: DataBundle, rng: torch.Generator) -> Key:
        key = draw_key(model, self.name, self.n_carriers, self.carriers_scope, self.image, rng, data.train_x.shape[1:])
        n = self.n_carriers
        key.tensors["mu"], key.tensors["sigma"] = torch.zeros(n), torch.full((n,), float(self.scale))
        key.tensors["values"] = pixels_to_weights(key)  # (2p/255 - 1) * SF
        key.meta["noise_seed"] = int(torch.randint(0, 2**62, (1,), generator=rng))
        carriers = CarrierSet.bind(model, key)
        carriers.write(carriers.per_param(key.tensors["values"]))
        return key

    def step_fn(self, model: nn.Module, key: Key) -> StepFn:
        """The training step bound to ``model`` (carriers, buffers and noise RNG made once)."""
        carriers = CarrierSet.bind(model, key)
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device if params else torch.device("cpu")
        uses_buffers = self.lam != 0.0 and self.replicas > 0
        state = ReplicaState(
            params,
            [torch.empty_like(p) for p in params] if uses_buffers else [],
            carriers,
            carriers.per_param(key.tensors["values"]),
            torch.Generator(device=device).manual_seed(int(key.meta["noise_seed"])),
        )
        args = (self.replicas, self.noise_std, self.lam, self.replica_lr)
        return StatefulStep(lambda m, b, f, o: tartaglione_step(m, b, f, o, state, *args), {"noise": state.generator})

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, key: Key) -> Tensor:
        return self.step_fn(model, key)(model, batch, loss_fn, optimizer)

