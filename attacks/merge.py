"""Model merging: the thief trains its own model of the same architecture, aligns its units to the
stolen model's and interpolates the weights (Git Re-Basin weight matching and its BatchNorm reset;
REPAIR's reading of why the reset matters)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from wmbench.api import Attack, AttackContext, bounded, plain_step
from wmbench.attacks.distill import agreement, fresh_copy
from wmbench.data import DataBundle, random_share
from wmbench.errors import NotApplicable
from wmbench.output_check import OutputReference
from wmbench.registry import ATTACKS
from wmbench.resync import resync
from wmbench.seeding import seeded
from wmbench.thief_models import thief_key, trained_once
from wmbench.train import Trainer, batches
from wmbench.units import unit_groups

BN_BATCHES = 200  # at most this many batches of the thief's share re-estimate the BatchNorm statistics
CHECK_IMAGES = 64  # the batch on which alignment must keep the thief's outputs
TOLERANCE = 1e-4  # as permute's: relative to the largest output and to each


@ATTACKS.register("merge")
@dataclass(frozen=True)
class Merge(Attack):
    """The stolen model interpolated with the thief's own, unit-aligned model of the same architecture.

    ``strength`` alpha in [0, 1]: every floating parameter and buffer becomes (1 - alpha) x stolen
    + alpha x own. The thief's own model is the stolen architecture re-initialised (``fresh_copy``)
    and trained with cross-entropy for ``epochs`` on ``data_fraction`` of the training set (images
    and labels, as for finetune). With ``align`` its units are first matched to the stolen model's
    by ``wmbench.resync`` in its ``signed`` mode (Hungarian on the signed cosine of incoming
    weights, group by group in graph order: weight matching of Git Re-Basin, Ainsworth et al.,
    ICLR 2023, in a single pass, not its coordinate descent over incoming and outgoing weights;
    resync's default absolute cosine would pair units with their negations, which averaging
    cancels); ``align: false`` averages unmatched units (naive averaging, the control arm). With
    ``reset_bn`` the BatchNorm running statistics are then re-estimated on the thief's share
    (cumulative average over at most 200 batches, no gradient: the "reset" of Git Re-Basin and
    REPAIR, Jordan et al., ICLR 2023). Alpha 0 returns the stolen model untouched. A model whose units cannot be matched (unit groups the dependency
    graph cannot give, an alignment that changes the thief's outputs) is "not applicable" with
    ``align``, never averaged misaligned.

    The matching reads the stolen weights, a mark's carriers included (the thief has no key): at
    alpha 1, where no stolen weight is left, the arrangement of the thief's units alone can still
    correlate with a mark (Tartaglione's on digits / small_cnn, leaderboard/README.md).

    Cost: the thief trains its own model once and tries every alpha against every stolen model.
    Everything the own model draws (its initialisation, its share of the data, its training's
    shuffles, the global generators while it trains) comes from ``ctx.strength_free_seed()``: the
    cell's seed and the attack's name, not the strength, the method nor the entry's label, so the
    aligned arm and its naive control face the same thief (a paired comparison) unless their
    thief's settings (``data_fraction``, ``epochs``, ``lr``, ...) differ. Each process keeps the
    trained model (``wmbench.thief_models``, the 8 used last), so the cells of one seed and label,
    at every alpha and for every method whose model has that architecture, share one training;
    alignment, interpolation and the BatchNorm reset still run in each cell. A parameter that no
    module resets (a ViT's class token) is re-drawn with the stolen tensor's mean and std, so such
    a model's thief is shared across alphas only.

    Effect: the merged model's top-1 agreement with the stolen model on the test set (1.0 at
    alpha 0, the untouched model)."""

    version: ClassVar[str] = "2"  # 2: one thief model per seed, for every strength, method and entry (it was drawn again for each strength); 1.0 at strength 0
    untouched_effect: ClassVar[float] = 1.0  # the untouched model agrees with itself

    data_fraction: float = bounded(1.0, gt=0, le=1)
    epochs: int = bounded(5, ge=1)
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.9, ge=0, le=1)
    weight_decay: float = bounded(5e-4, ge=0)
    batch_size: int = bounded(64, ge=2)
    align: bool = True
    reset_bn: bool = True

    def check_strength(self, strength: float) -> str | None:
        return None if 0.0 <= strength <= 1.0 else "merge strength is the interpolation weight alpha in [0, 1]"

    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> nn.Module:
        problem = self.check_strength(strength)
        if problem:
            raise ValueError(f"merge: {problem}, got {strength}")
        stolen = model.to(ctx.device).eval()
        own, share = self.own_model(stolen, ctx)
        if self.align:
            own = align_to(own, stolen, share.train_x[:CHECK_IMAGES].to(ctx.device))
        merged = interpolate(stolen, own, strength)
        if self.reset_bn:
            reestimate_bn(merged, share.train_x, self.batch_size, ctx.device)
        ctx.effect = agreement(merged, stolen, ctx.data.test_x, ctx.device)
        return merged.eval()

    def own_model(self, stolen: nn.Module, ctx: AttackContext) -> tuple[nn.Module, DataBundle]:
        """The thief's model and its share of the data, drawn from ``ctx.strength_free_seed()``
        (the architecture re-initialised, the share, the training's shuffles and the global
        generators while it trains), so the same at every strength and against every method's
        model; trained once per process (``wmbench.thief_models``)."""
        seed = ctx.strength_free_seed()
        rng = torch.Generator().manual_seed(seed)
        own = fresh_copy(stolen, rng).to(ctx.device).eval()
        share = random_share(ctx.data, self.data_fraction, rng)
        config = ctx.retraining(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        key = thief_key(own, share.train_x[:2].to(ctx.device), share, config, ctx.device, type(self).__qualname__, self.version, seed)

        def train() -> nn.Module:
            with seeded(seed, ctx.device):
                Trainer(share, config, ctx.device, rng, "merge", ctx.progress).fit(own, plain_step)
            return own.eval()

        return trained_once(key, train, ctx.device), share


@torch.no_grad()
def align_to(own: nn.Module, stolen: nn.Module, example: Tensor) -> nn.Module:
    """``own`` with its units matched onto ``stolen``'s (``wmbench.resync``, no carriers left out:
    the thief has no key); NotApplicable where some units cannot be matched or the matching
    changes ``own``'s outputs on ``example`` (a coupling it does not respect, e.g. GroupNorm groups)."""
    own.eval()
    _, skipped = unit_groups(own, example[:2])  # NotApplicable where torch-pruning cannot trace
    if skipped:
        raise NotApplicable(f"merge: {skipped} unit groups cannot be matched (no channel group from the graph analysis: "
                            "e.g. concatenations, grouped convolutions); averaging them would mix unrelated units")
    reference = OutputReference.of_function(own, example, TOLERANCE, "merge")
    aligned = resync(own, stolen, example, signed=True, check_outputs=False)  # checked below, whole: no group is left in place
    if not reference.kept(aligned):
        raise NotApplicable("merge: matching the thief's units to the stolen model's changed the thief's outputs "
                            "(a coupling resync does not keep, e.g. GroupNorm groups); averaging would mix unrelated units")
    return aligned.eval()


@torch.no_grad()
def interpolate(stolen: nn.Module, own: nn.Module, alpha: float) -> nn.Module:
    """A copy of ``stolen`` whose floating parameters and buffers are (1 - alpha) x stolen + alpha x
    own; integer buffers (BatchNorm's batch count) stay the stolen model's."""
    merged = copy.deepcopy(stolen)
    theirs = own.state_dict()
    for name, tensor in merged.state_dict().items():
        if tensor.is_floating_point():
            other = theirs[name].to(tensor)
            if other.shape != tensor.shape:
                raise NotApplicable(f"merge: {name} has shape {list(other.shape)} in the thief's model, {list(tensor.shape)} in the stolen one")
            tensor.copy_((1.0 - alpha) * tensor + alpha * other)
    return merged


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: Tensor, batch_size: int, device: torch.device, max_batches: int = BN_BATCHES) -> None:
    """Every BatchNorm's running mean and variance recomputed from ``x`` (the first ``max_batches``
    batches, in order): the model in eval mode but its BatchNorms in train mode, momentum None (a
    cumulative average), no gradient; the model left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i, (xb, _) in enumerate(batches(x, torch.zeros(len(x)), batch_size, device)):
            if i == max_batches:
                break
            if len(xb) > 1:  # a batch of one has no variance
                model(xb)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.eval()
