"""Conv/Linear layers whose weight is used outside their forward (``F.linear(x, layer.weight)``, as
torchvision's Swin attention does): graph analyses that follow module calls (torch-pruning's, and
with it structured pruning) do not see them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

LAYER_KINDS = (nn.modules.conv._ConvNd, nn.Linear)


def layers_used_outside_forward(model: nn.Module, example: Tensor) -> list[str]:
    """The qualified names, in definition order, of the Conv/Linear layers whose weight takes part
    in the output for ``example`` although their forward never runs: a module that reads a
    layer's weight through ``F.linear`` or ``F.conv2d`` (torchvision's Swin attention, with its
    ``qkv`` and ``proj``). Graph analyses that follow module calls (torch-pruning's, and with it
    structured pruning, permute's unit groups, resync) do not see such a layer.

    One forward in eval mode with gradients (frozen parameters made trainable for it, the mode and
    flags restored after), forward hooks on every Conv/Linear; where one did not run, the autograd
    graph of the outputs is walked for its weight (a leaf; with ``torch.nn.utils.parametrize``, the
    originals). Not counted: a layer whose weight is also another layer's that ran (tied weights),
    and the ``out_proj`` of an ``nn.MultiheadAttention`` that ran (its weight is used by
    ``F.multi_head_attention_forward``, and the attention layer is handled as a whole). Empty
    where the forward fails: what runs then reports that failure itself."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_KINDS) and isinstance(getattr(m, "weight", None), Tensor)]
    if not layers:
        return []
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, _i, _o: ran.add(id(mod))) for m in model.modules() if isinstance(m, (*LAYER_KINDS, nn.MultiheadAttention))]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    was_training = model.training
    try:
        with torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            out = model.eval()(example)
    except Exception:  # noqa: BLE001 - the caller's own forward reports why it fails
        return []
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    handled = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention) and id(m) in ran}
    seen = {id(p) for _, m in layers if id(m) in ran for p in _weights(m)}
    unseen = [(n, m) for n, m in layers if id(m) not in ran and id(m) not in handled and not any(id(p) in seen for p in _weights(m))]
    if not unseen:
        return []
    leaves = _graph_leaves(out)
    return [n for n, m in unseen if any(id(p) in leaves for p in _weights(m))]


def _weights(layer: nn.Module) -> list[Tensor]:
    """The leaf tensors of a layer's weight: the parameter, or a parametrization's originals."""
    found = [p for name, p in layer.named_parameters() if name == "weight" or name.startswith("parametrizations.weight.")]
    return found or [layer.weight]


def _graph_leaves(out: Any) -> set[int]:
    """The ids of the tensors the autograd graph of ``out``'s tensors accumulates gradients into."""
    stack = []

    def roots(value: Any) -> None:
        if isinstance(value, Tensor):
            if value.grad_fn is not None:
                stack.append(value.grad_fn)
        elif isinstance(value, (tuple, list)):
            for v in value:
                roots(v)
        elif isinstance(value, dict):
            for v in value.values():
                roots(v)

    roots(out)
    visited: set[Any] = set()
    leaves: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn in visited:
            continue
        visited.add(fn)
        variable = getattr(fn, "variable", None)
        if isinstance(variable, Tensor):
            leaves.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return leaves
