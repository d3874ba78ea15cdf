"""Devices: which one a run asks for, and the label a result row records."""

from __future__ import annotations

import torch

from wmbench.errors import WmbenchError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WmbenchError("device cuda requested but no CUDA GPU is available (use --device cpu)")
    return device


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device, availability unchecked; a typo is a WmbenchError."""
    try:
        return torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise WmbenchError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None


def device_label(device: torch.device) -> str:
    """The device a row was computed on: ``cpu``, or ``cuda:N`` with the GPU's name."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"
