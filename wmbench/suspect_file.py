"""Reading a suspect model file for ``wmbench detect``: safetensors only (a pickle, TorchScript or
damaged file is named and refused, never loaded), its tensor names read against the key's
architecture (wrapper prefixes removed where that gives exactly its names), its shapes and dtypes
checked before any tensor reaches the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wmbench.cache import load_weights
from wmbench.errors import WmbenchError
from wmbench.model_checks import nonfinite_tensor
from wmbench.safe_io import special_file


def suspect_shapes(path: Path, expected: set[str]) -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file, read from its header (no tensor is loaded), under
    the names of the architecture whose tensor names are ``expected`` (``_strip_prefix``)."""
    from safetensors import safe_open

    if path.is_dir():
        raise WmbenchError(f"{path}: a directory, not a model file")
    if special_file(path):
        raise WmbenchError(f"{path}: not a regular file (a model file is safetensors)")
    if not path.is_file():
        raise WmbenchError(f"{path}: no such model file")
    try:
        with safe_open(str(path), "pt") as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises several types for damaged or foreign files
        raise unreadable(path, exc) from None
    if "meta" in metadata and "method" in metadata:
        raise WmbenchError(f"{path}: a wmbench key file, not a model (--model takes the model, --key the key)")
    return _strip_prefix(shapes, expected)


def unreadable(path: Path, exc: Exception) -> WmbenchError:
    """The one-line refusal of a model file safetensors could not read (``exc``): its format named
    where it is known (a torch.save pickle, TorchScript, an empty or truncated file)."""
    from wmbench.foreign_format import foreign_format

    kind = foreign_format(path)
    if kind is not None:
        return WmbenchError(f"{path}: {kind}")
    return WmbenchError(f"{path}: not a safetensors model file ({exc}); wmbench never loads pickled checkpoints")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _strip_prefix(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    """``state`` without the prefixes wrappers add to every name (nested ones too), unless its names
    already are the ``expected`` ones (an architecture whose own names start with ``module.``).
    Names still not the architecture's lose the leading path common to all of them (the attribute
    a training wrapper holds the network in: Lightning's ``model.``) only where that makes them
    exactly the architecture's (up to ``_optional`` counters); a file that matches in part keeps
    its names, which ``check_shapes`` then reports."""
    while state and not set(state) <= expected:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    if not state or set(state) <= expected:
        return state
    parts = [k.split(".") for k in state]
    for depth in range(1, min(len(p) for p in parts)):  # a name keeps its last part
        if len({tuple(p[:depth]) for p in parts}) > 1:
            break
        stripped = {".".join(p[depth:]): v for p, v in zip(parts, state.values())}
        if set(stripped) <= expected and all(k in stripped for k in expected if not _optional(k)):
            return stripped
    return state


def _optional(name: str) -> bool:
    """A buffer a suspect file may leave out without changing what the model computes in eval mode
    (BatchNorm's batch counters): filled from the rebuilt architecture."""
    return name.endswith("num_batches_tracked")


def load_suspect(model: nn.Module, path: Path, resized: bool = False) -> None:
    """Load a safetensors state dict into ``model``; any difference of names or shapes is an error
    (with ``resized``, shapes may differ: the modules take the file's sizes, e.g. after dummy units)."""
    from safetensors.torch import load_file

    expected = model.state_dict()
    shapes = suspect_shapes(path, set(expected))
    check_shapes({k: list(v.shape) for k, v in expected.items()}, shapes, resized)
    try:
        state = _strip_prefix(load_file(str(path)), set(expected))
    except Exception as exc:
        raise unreadable(path, exc) from None
    state.update({k: v for k, v in expected.items() if _optional(k) and k not in state})
    cast = [k for k, v in state.items() if k in expected and expected[k].is_floating_point() and not v.is_floating_point()]
    if cast:  # load_state_dict would cast silently: an int8 or bool file would read as a model
        raise WmbenchError(f"{path}: not a float model file ({cast[0]} is {state[cast[0]].dtype})")
    stored = {k: v.dtype for k, v in state.items()}
    # checked as loaded: float8 has no isfinite, and a float64 1e300 is an infinity in float32
    state = {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() and expected[k].is_floating_point() else v
             for k, v in state.items()}
    broken = nonfinite_tensor(state)
    if broken is not None:
        read_as = f" (its {stored[broken]} read as {state[broken].dtype})" if stored[broken] != state[broken].dtype else ""
        raise WmbenchError(f"{path}: {broken} holds NaN or infinite values{read_as}: no detection can be read from it")
    if resized:
        adopt_shapes(model, state)
    load_weights(model, state)


def check_shapes(expected: dict[str, list[int]], state: dict[str, list[int]], resized: bool = False, grown_hint: bool = False) -> None:
    """Names and shapes of the key's architecture against the suspect file's; any difference is an
    error (with ``resized``, only names must match: resync maps resized units back). ``grown_hint``:
    where the names match and every differing tensor is only larger (units added, as by
    ``dummy_neurons``), the error says that ``--resync --reference`` reads such a model."""
    missing = [k for k in expected if k not in state and not _optional(k)]
    unexpected = [k for k in state if k not in expected]
    changed = [k for k in expected if k in state and list(state[k]) != list(expected[k])]
    reshaped = [f"{k} {state[k]} (key: {expected[k]})" for k in changed]
    if resized:  # dummy units: sizes may differ, names may not (resync maps the units back)
        reshaped = []
    if missing or unexpected or reshaped:
        parts = [f"{what} {', '.join(names[:2])}{f' and {len(names) - 2} more' if len(names) > 2 else ''}" for what, names in
                 (("the model lacks", missing), ("the key's architecture lacks", unexpected), ("shapes differ:", reshaped)) if names]
        grown = grown_hint and reshaped and not missing and not unexpected and all(_grown(state[k], expected[k]) for k in changed)
        hint = " (its layers are larger than the key's, as after added units: --resync --reference OWNER_MODEL.safetensors maps them back)" if grown else ""
        raise WmbenchError(f"key does not match the model: {'; '.join(parts)}{hint or _partial_prefix(unexpected, expected)}")


def _partial_prefix(unexpected: list[str], expected: dict[str, list[int]]) -> str:
    """A hint where a name the architecture lacks is one of its names under a prefix that only some
    of the file's names carry (``_strip_prefix`` removes a prefix from all names or none: which
    names are the model's is then the owner's call)."""
    for name in unexpected:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            if ".".join(parts[depth:]) in expected:
                prefix = ".".join(parts[:depth]) + "."
                return (f" ({name} is the architecture's {'.'.join(parts[depth:])} under {prefix}, a prefix not every name in the file carries: "
                        "one is removed only from all names; save the model's tensors alone)")
    return ""


def _grown(shape: list[int], key_shape: list[int]) -> bool:
    """Whether ``shape`` is ``key_shape`` with some sizes larger and none smaller."""
    return len(shape) == len(key_shape) and all(a >= b for a, b in zip(shape, key_shape))


def adopt_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize ``model``'s tensors to those of ``state`` (and its modules' size attributes)."""
    from wmbench.units import assign, refresh_shape

    for name, module in model.named_modules():
        changed = False
        for local, t in list(module._parameters.items()) + list(module._buffers.items()):
            full = f"{name}.{local}" if name else local
            if t is not None and full in state and state[full].shape != t.shape:
                assign(module, local, torch.empty_like(state[full], dtype=t.dtype))
                changed = True
        if changed:
            refresh_shape(module)
