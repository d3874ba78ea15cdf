"""Function-preserving rescaling: per-channel factors that BatchNorm or the next layer undo exactly.

The coupled layers are found in the model's torch.fx graph (no per-architecture tables):

- BN rule: a Conv/Linear whose only user is a BatchNorm with running statistics. Output channel c is
  multiplied by a_c (weight row and bias), the BN running mean by a_c and the running variance set
  to a_c^2 (var + eps) - eps, so that sqrt(var + eps) scales by exactly a_c: the eval-mode output
  is unchanged. With ``negate``, half of those channels (at random) also flip sign: the conv row,
  running mean and BN weight (gamma) are negated; beta is unchanged.
- ReLU rule: a Conv/Linear whose output reaches another Conv/Linear only through positively
  homogeneous, per-channel operations (ReLU, max/avg pooling, dropout, identity, a final flatten).
  Output channel c is multiplied by a_c > 0 and the consumer's input channel c (for a flatten,
  its block of features) by 1/a_c.

- Attention rule: in every ``nn.MultiheadAttention`` (torchvision's ViT), query dimension i is
  multiplied by a_i and key dimension i by 1/a_i, value dimension j by b_j and out_proj's column j
  by 1/b_j (``wmbench.attention``); with ``negate``, half of the factors also flip sign.

A transformer's residual stream is not rescaled: each LayerNorm normalises over all its channels,
so no per-channel factor passes through it (``permute`` does move it).

Where no rule finds a coupling (e.g. swin_t: LayerNorm and GELU everywhere, attention weights
used through ``F.linear``), or the model cannot be traced with torch.fx and has no attention layer,
the model is left unchanged, the effect is 0 and ``detect_note`` says why: never a crash. Where the
rules reach only part of the model (squeezenet1_1's concatenations: 0.4% of its Conv/Linear weights;
cifar_speednet's pooled blocks and mobilenet_v3_small's Hardswish classifier: about 61%),
``detect_note`` gives the share of the Conv/Linear weights rescaled, as ``permute`` gives the share
it leaves in place: the effect is measured over the rescaled channels only.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from itertools import chain
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from wmbench.api import Attack, AttackContext
from wmbench.attention import attention_layers, random_map, rearrange
from wmbench.errors import WmbenchError
from wmbench.models import weight_params
from wmbench.registry import ATTACKS

log = logging.getLogger(__name__)

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
ELEMENTWISE_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.dropout}


class Untraceable(WmbenchError):
    """torch.fx cannot trace the model, so no coupling can be found."""


@dataclass(frozen=True)
class BNPair:
    layer: nn.Module
    bn: nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class ReLUPair:
    producer: nn.Module
    consumer: nn.Module
    per_channel: int  # consumer input features per producer channel (> 1 after a flatten)


MAX_LOG_FACTOR = 30.0
# Below this share of its Conv/Linear weights rescaled, a model's row says how much was (a
# classifier left alone behind a global pool, resnet18's 0.02%, goes unsaid).
FULL_COVERAGE = 0.99


@ATTACKS.register("scale")
@dataclass(frozen=True)
class Scale(Attack):
    """The scale-invariance attack; ``strength`` s draws each factor as a = exp(U(-s, s)).

    The model's function (eval mode) is unchanged, every position-keyed carrier of a rescaled
    channel moves. ``negate`` also flips the sign of a random half of the channels a BN follows
    and of the attention layers' query/key and value dimensions.

    Effect: the mean |log a| over all rescaled channels (about s / 2 while s is small: a BatchNorm
    channel's factor is floored where its running variance would fall under BN's eps, so large s
    gives less); 0 where no coupling is found or the model cannot be traced (``detect_note`` then
    says so). Where under 99% of the Conv/Linear weights (by count) are rescaled, ``detect_note``
    gives that share: the effect says how far the rescaled channels moved, not how much of the
    model did. ``negate`` acts on BatchNorm channels and attention dimensions only: a model with
    neither is only rescaled."""

    version: ClassVar[str] = "2"  # 2: attention layers rescaled too
    negate: bool = False

    def check_strength(self, strength: float) -> str | None:
        # Beyond, a factor's square (BatchNorm's running variance) or its inverse times a small
        # weight leaves float32's normal range: the model would no longer compute the same function.
        ok = math.isfinite(strength) and 0 <= strength <= MAX_LOG_FACTOR
        return None if ok else f"scale strength is the largest |log a|, in [0, {MAX_LOG_FACTOR}]"

    @torch.no_grad()
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> None:
        problem = self.check_strength(strength)
        if problem:
            raise ValueError(f"{problem}, got {strength}")
        logs: list[Tensor] = []
        try:
            bn_pairs, relu_pairs = coupled_layers(model)
        except Untraceable as exc:
            log.warning("%s; its convolutions and linear layers are unchanged", exc)
            ctx.notes["detect_note"] = f"{exc}; " + ("only its attention layers rescaled" if attention_layers(model) else "model unchanged")
            bn_pairs, relu_pairs = [], []
        for pair in bn_pairs:
            logs.append(self._scale_bn(pair, strength, ctx.rng))
        for rp in relu_pairs:
            logs.append(_scale_relu(rp, strength, ctx.rng))
        for _, mha in attention_layers(model):
            move = random_map(mha, ctx.rng, strength, self.negate, permute=False)
            rearrange(mha, move)
            logs += [move.qk_factor.abs().log().flatten(), move.v_factor.abs().log().flatten()]  # type: ignore[union-attr]
        if not logs and "detect_note" not in ctx.notes:
            log.warning("scale: no coupled layers found in %s; the model is unchanged", type(model).__name__)
            ctx.notes["detect_note"] = f"scale: no function-preserving coupling found in {type(model).__name__}; model unchanged"
        elif logs:
            note = coverage_note(model, bn_pairs, relu_pairs)
            if note:
                log.info("%s", note)
                ctx.notes["detect_note"] = "; ".join(filter(None, [ctx.notes.get("detect_note"), note]))
        ctx.effect = float(torch.cat(logs).abs().mean()) if logs else 0.0

    def _scale_bn(self, pair: BNPair, s: float, rng: torch.Generator) -> Tensor:
        layer, bn = pair.layer, pair.bn
        var = bn.running_var.detach().double().cpu()  # type: ignore[union-attr]
        log_a = _uniform(len(var), s, rng)
        floor = 0.5 * torch.log(bn.eps / (var + bn.eps))  # keeps the new running variance >= 0
        log_a = torch.maximum(log_a, floor)
        a = log_a.exp()
        sign = torch.ones_like(a)
        if self.negate:
            flip = torch.rand(len(a), generator=rng) < 0.5
            if bn.affine:
                sign[flip] = -1.0
        _scale_rows(layer, sign * a)
        bn.running_mean.mul_((sign * a).to(bn.running_mean))  # type: ignore[union-attr]
        bn.running_var.copy_((a * a * (var + bn.eps) - bn.eps).clamp_min(0).to(bn.running_var))  # type: ignore[union-attr]
        if bn.affine:
            bn.weight.mul_(sign.to(bn.weight))
        return log_a


def rescaled_share(model: nn.Module, bn_pairs: list[BNPair], relu_pairs: list[ReLUPair]) -> tuple[float, int, int]:
    """The share (by count) of ``model``'s Conv/Linear and attention-projection weights that these
    couplings and the attention rule rescale (rows or columns), with how many of those weight
    tensors are rescaled and how many there are."""
    touched = {id(p.layer.weight) for p in bn_pairs}
    touched |= {id(p.producer.weight) for p in relu_pairs} | {id(p.consumer.weight) for p in relu_pairs}
    touched |= {id(p) for _, mha in attention_layers(model) for p in mha.parameters()}
    weights = list(weight_params(model).values())
    total = sum(w.numel() for w in weights)
    hit = [w for w in weights if id(w) in touched]
    return (sum(w.numel() for w in hit) / total if total else 0.0), len(hit), len(weights)


def coverage_note(model: nn.Module, bn_pairs: list[BNPair], relu_pairs: list[ReLUPair]) -> str | None:
    """What ``detect_note`` says where the couplings rescale under ``FULL_COVERAGE`` of the weights."""
    share, hit, total = rescaled_share(model, bn_pairs, relu_pairs)
    if share >= FULL_COVERAGE:
        return None
    return (f"scale: {_percent(share)} of the Conv/Linear weights rescaled ({hit} of {total} weight tensors; "
            f"the others have no function-preserving coupling and stay unchanged)")


def _percent(share: float) -> str:
    """A share as a percentage that a small one does not round to 0 (0.4%, 61.4%)."""
    return f"{100 * share:.1f}%" if share >= 0.001 else f"{100 * share:.2g}%"


def _uniform(n: int, s: float, rng: torch.Generator) -> Tensor:
    """``n`` draws of U(-s, s), float64 on the CPU."""
    return (2.0 * torch.rand(n, generator=rng, dtype=torch.float64) - 1.0) * s


def _scale_rows(layer: nn.Module, factor: Tensor) -> None:
    """Multiply output channel c of a Conv/Linear (weight row and bias) by factor[c]."""
    w = layer.weight
    w.mul_(factor.to(w).view(-1, *([1] * (w.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(factor.to(layer.bias))


def _scale_relu(pair: ReLUPair, s: float, rng: torch.Generator) -> Tensor:
    log_a = _uniform(pair.producer.weight.shape[0], s, rng)
    a = log_a.exp()
    _scale_rows(pair.producer, a)
    scale_consumer(pair, 1.0 / a)
    return log_a


def scale_consumer(pair: ReLUPair, factor: Tensor) -> None:
    """Multiply the consumer's input channel c of a ReLU-rule ``pair`` (after a flatten, its block
    of features) by factor[c] (one per producer channel): the other half of the rule, which
    ``wmbench.resync`` undoes with the inverse factors."""
    per_input = factor.repeat_interleave(pair.per_channel)  # per consumer input feature/channel
    w = pair.consumer.weight
    if isinstance(pair.consumer, nn.Linear):
        w.mul_(per_input.to(w).view(1, -1))
    else:  # conv weight (out, in / groups, *k): input channel c sits in group c // (in / groups)
        groups = pair.consumer.groups
        per_group_in, per_group_out = w.shape[1], w.shape[0] // groups
        f = per_input.view(groups, 1, per_group_in).expand(groups, per_group_out, per_group_in)
        w.mul_(f.reshape(w.shape[0], per_group_in, *([1] * (w.dim() - 2))).to(w))


def coupled_layers(model: nn.Module) -> tuple[list[BNPair], list[ReLUPair]]:
    """The BN-rule and ReLU-rule couplings of ``model``, in graph order, from its torch.fx trace."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means the same thing here
        raise Untraceable(f"scale: cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}") from None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    def module(node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        found = model.get_submodule(str(node.target))
        if calls[node.target] != 1 and any(True for _ in chain(found.parameters(recurse=False), found.buffers(recurse=False))):
            return None  # a shared layer (or BatchNorm statistics) would be rescaled twice; shared stateless ops are fine
        return found

    bn_pairs: list[BNPair] = []
    relu_pairs: list[ReLUPair] = []
    for node in graph.nodes:
        layer = module(node)
        if not isinstance(layer, LAYERS) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = module(user)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            if bn.running_var is not None and user.args[0] is node and bn.num_features == layer.weight.shape[0]:
                bn_pairs.append(BNPair(layer, bn))
            continue
        pair = _follow(node, layer, module)
        if pair is not None:
            relu_pairs.append(pair)
    return bn_pairs, relu_pairs


def _follow(node: fx.Node, producer: nn.Module, module) -> ReLUPair | None:  # type: ignore[no-untyped-def]
    """The consumer reached from ``node`` through single-user homogeneous ops, or None."""
    flattened = False
    cur = node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if not nxt.args or nxt.args[0] is not cur or any(isinstance(a, fx.Node) for a in nxt.args[1:]):
            return None
        target = module(nxt) if nxt.op == "call_module" else None
        if isinstance(target, LAYERS):
            return _pair(producer, target, flattened)
        if _is_flatten(nxt, target) and not flattened:
            flattened = True
        elif not _is_homogeneous(nxt, target, flattened or isinstance(producer, nn.Linear)):  # a pool after a Linear mixes its features
            return None
        cur = nxt
    return None


def _pair(producer: nn.Module, consumer: nn.Module, flattened: bool) -> ReLUPair | None:
    channels = producer.weight.shape[0]
    if isinstance(consumer, nn.Linear):
        producer_is_linear = isinstance(producer, nn.Linear)
        if not producer_is_linear and not flattened:
            return None  # a Linear on a conv's last spatial axis
        if consumer.in_features % channels:
            return None
        k = consumer.in_features // channels
        return ReLUPair(producer, consumer, k) if (k == 1 or not producer_is_linear) else None
    if flattened or isinstance(producer, nn.Linear) or type(consumer) is not type(producer):
        return None
    return ReLUPair(producer, consumer, 1) if consumer.in_channels == channels else None


def _is_flatten(node: fx.Node, target: nn.Module | None) -> bool:
    if isinstance(target, nn.Flatten):
        return target.start_dim == 1 and target.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _is_homogeneous(node: fx.Node, target: nn.Module | None, flattened: bool) -> bool:
    """A per-channel op with f(a x) = a f(x) for a > 0 (only elementwise ones after a flatten)."""
    if target is not None:
        return isinstance(target, ELEMENTWISE_MODULES if flattened else HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in (ELEMENTWISE_FUNCTIONS if flattened else HOMOGENEOUS_FUNCTIONS)
    return node.op == "call_method" and node.target == "relu"
