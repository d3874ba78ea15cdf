"""Whether an attack changed any of a key's carriers: a mark outside the tensors an attack acts on
(BatchNorm's gamma and beta, a bias, under noise, pruning or quantization of Conv/Linear weights)
survives it untouched, and the row says so rather than leave it to read as robustness."""

from __future__ import annotations

import torch
from torch import nn

from wmbench.api import Carriers


def untouched_carriers_note(label: str, carriers: Carriers, trained: nn.Module, attacked: nn.Module) -> str | None:
    """``"<label> left all N of the key's carriers unchanged ..."`` where every carrier holds, in
    ``attacked``, the trained model's value bit for bit (same tensor names and shapes); None where
    any changed, moved out of its tensor, or the key names none (each position counted once). The note says whether the attack
    changed none of the carriers' tensors (a mark outside what it acts on: a BatchNorm mark under
    noise) or only their other entries (large carriers that magnitude pruning passes over), or
    none of the model's tensors at all (a wrapper, a model handed back in train mode)."""
    before, after = trained.state_dict(), attacked.state_dict()
    total, tensors_changed = 0, False
    for name, idx in carriers.items():
        old, new = before.get(name), after.get(name)
        if old is None or new is None or old.shape != new.shape or old.dtype != new.dtype:
            return None
        positions = idx.long().unique()  # a position the key lists twice is one carrier
        if not torch.equal(old.detach().reshape(-1)[positions.to(old.device)], new.detach().reshape(-1)[positions.to(new.device)].to(old.device)):
            return None
        total += positions.numel()
        tensors_changed = tensors_changed or not torch.equal(old, new)
    if not total:
        return None
    if tensors_changed:
        why = "it changed other entries of their tensors"
    elif _same_state(before, after):
        why = "it changed no weight or buffer of the model"
    else:
        why = "the mark lies outside the tensors it changed"
    return f"{label} left all {total} of the key's carriers unchanged ({why})"


def _same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same names, shapes, dtypes and values."""
    return before.keys() == after.keys() and all(
        before[k].shape == after[k].shape and before[k].dtype == after[k].dtype and torch.equal(before[k].cpu(), after[k].cpu()) for k in before)


def reshaped_carriers_note(carriers: Carriers, trained: nn.Module, attacked: nn.Module) -> str | None:
    """Where a detector returned a figure on ``attacked`` although a tensor holding the key's
    carriers changed shape (``dummy_neurons`` grows layers, structured pruning shrinks them): the
    flat positions it read point at other weights now (the built-ins' ``keyed_tensor`` refuses such
    a tensor, "detection not applicable"); None where every carrier tensor kept its shape or is
    missing from either model (said elsewhere)."""
    before, after = trained.state_dict(), attacked.state_dict()
    changed = [f"{name} {_dims(before[name])} -> {_dims(after[name])}" for name in carriers
               if name in before and name in after and before[name].shape != after[name].shape]
    if not changed:
        return None
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return (f"the key's carrier tensors changed shape ({', '.join(changed[:3])}{more}), yet the detector read them: "
            "its flat positions now point at other weights")


def _dims(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"
