"""Devices: which one a run asks for, and the label a result row records."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from wmbench.errors import WmbenchError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WmbenchError(f"device {name} requested but no CUDA GPU is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise WmbenchError(f"device {name} requested but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}")
    return device


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device, availability unchecked; a typo is a WmbenchError."""
    try:
        return torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise WmbenchError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None


def device_label(device: torch.device) -> str:
    """The device a row was computed on: ``cpu`` with the processor's model name (where the OS
    tells it), or ``cuda:N`` with the GPU's name. Timings differ about 2x between machines that
    share a model name, so this tells machines apart only as far as the name does."""
    if device.type == "cpu":
        name = cpu_name()
        return f"cpu {name}" if name else "cpu"
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


@functools.cache
def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name: the first ``model name`` line of ``cpuinfo`` (Linux), else
    ``platform.processor()``; empty when neither says."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return " ".join(platform.processor().split())
