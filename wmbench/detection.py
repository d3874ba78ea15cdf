"""Detection of one suspect model, optionally resynchronised onto the owner's model first."""

from __future__ import annotations

import torch

from wmbench.api import Carriers, Key, Method
from wmbench.errors import NotApplicable


def detect(
    method: Method, model: torch.nn.Module, key: Key, threshold: float, reference: torch.nn.Module | None = None, example: torch.Tensor | None = None
) -> tuple[float | None, float | None, float | None, bool | None, str | None]:
    """(stat, p-value, log10 p-value, detected, note); a model that no longer fits the key gives a
    note instead. With a ``reference`` (the owner's model) and an ``example`` input batch, the
    suspect is first resynchronised onto the reference's units (wmbench.resync), whatever the method."""
    note = None
    if reference is not None:
        from wmbench.resync import resync

        try:
            if example is None:
                raise ValueError("resync needs an example input batch")
            model = resync(model, reference, example, _carriers(method, key))
        except Exception as exc:  # noqa: BLE001 - graph analysis of an odd model: fall back to plain detection, say so
            note = f"resync failed ({type(exc).__name__}: {exc}); plain detection"
    try:
        result = method.detect(model, key)
    except NotApplicable as exc:
        return None, None, None, None, f"detection not applicable: {exc}" + (f"; {note}" if note else "")
    return result.stat, result.pvalue, result.log10_pvalue, result.detected(threshold), note


def _carriers(method: Method, key: Key) -> dict[str, torch.Tensor]:
    """The key's carriers, left out of the resynchronisation's similarity (none if the method fails)."""
    try:
        return method.carriers(key)
    except Exception:  # noqa: BLE001 - a plug-in's carriers() is optional for resync
        return {}


def carriers_problem(carriers: Carriers, state: dict[str, torch.Tensor]) -> str | None:
    """Why a key's carriers cannot be positions in ``state`` (a tensor it lacks, float or
    out-of-range indices: a negative one would wrap to the tensor's end), or None."""
    for name, idx in carriers.items():
        if name not in state:
            return f"it names a tensor {name!r} the model lacks"
        if idx.dtype.is_floating_point or (len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= state[name].numel())):
            return f"positions outside {name} ({state[name].numel()} weights)"
    return None

