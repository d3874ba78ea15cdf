"""What a trained key records of its model, so ``wmbench detect`` can rebuild it, and the checks a
freshly drawn key passes before that record is written into it."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from wmbench.api import Key, component_config
from wmbench.data import DataBundle
from wmbench.detection import carriers_problem
from wmbench.errors import WmbenchError
from wmbench.grid import TrainCell
from wmbench.names import shown

RESERVED_META = ("model", "data", "method", "key_source")  # key.meta entries wmbench writes (owner_record, wmbench embed)


def owner_record(cell: TrainCell, data: DataBundle) -> dict[str, Any]:
    """What a key records of its model so ``wmbench detect`` can rebuild it: the architecture (a
    registry name and args), the data's shape, and the method's training args."""
    method = component_config(cell.method.obj)
    model = component_config(cell.model.obj)
    return {
        "model": {"name": model["name"], "version": model["version"], "args": model["args"]},
        "data": {
            "name": cell.dataset.obj.name,
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": list(data.image_size),
            "task": data.task,
        },
        "method": {"name": method["name"], "version": method["version"], "args": method["args"]},
    }


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def data_record_problem(data: Mapping[str, Any]) -> str | None:
    """Why a key's ``data`` record (``owner_record``: integers, as embed writes them) cannot be
    read back, or None: ``num_classes`` and ``in_channels`` integers >= 1, ``image_size`` two of
    them. A float (``10.7``), a bool or a numeral in text is refused, not truncated into another
    architecture than the one the key was drawn on."""
    for field in ("num_classes", "in_channels"):
        if not _count(data.get(field)):
            return f"{field} {shown(data.get(field))} is not an integer >= 1"
    size = data.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_count(v) for v in size)):
        return f"image_size {shown(size)} is not a list of two integers >= 1"
    return None


def record_owner(cell: TrainCell, data: DataBundle, key: Key, model: torch.nn.Module) -> None:
    """Write ``owner_record`` into a key the method just drew on ``model``, after checking that the
    method left wmbench's entries alone and that its carriers are positions in the model (a
    WmbenchError naming the method otherwise)."""
    if not isinstance(key, Key):
        raise WmbenchError(f"method {cell.method.label!r}: embed returned {type(key).__name__}, not a wmbench.api.Key (a missing `return key`?)")
    reserved = sorted(set(key.meta) & set(RESERVED_META))
    if reserved:
        raise WmbenchError(f"method {cell.method.label!r} set key.meta[{reserved[0]!r}], which wmbench keeps for its own record of the key; use another name")
    try:
        problem = carriers_problem(cell.method.obj.carriers(key), model.state_dict())
    except NotImplementedError:  # carriers() is optional for a plug-in
        problem = None
    if problem:
        raise WmbenchError(f"method {cell.method.label!r} drew a key whose carriers are not positions in the model: {problem}")
    key.meta.update(owner_record(cell, data))
