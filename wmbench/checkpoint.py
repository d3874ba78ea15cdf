"""Epoch checkpoints: a training stopped midway (a killed run, the end of a session) continues from
its last finished epoch and ends with the same weights, bit for bit, as one never stopped.

One safetensors file per ``Trainer.fit`` call of a training (``fit0``, ``fit1``: Li's
pre-training and fine-tuning), written atomically after an epoch. It holds what the next epoch
depends on: the weights and buffers, the optimiser's state (momentum), the trainer's generator
(shuffling, augmentation), torch's global generators (dropout) and the state of a
``StatefulStep``; the learning-rate schedule is replayed to the epoch. A checkpoint is used only
by the training and fit it was made for, under the same device and thread count (both change float
results), and only while its SHA-256 (of its progress record and every tensor, in its metadata)
matches: anything else trains the fit from its start, with a warning, and a checkpoint that is
damaged, edited or another training's is set aside (``.damaged``), as the cache sets aside such
entries. A digest is no signature: whoever rewrites it with the file is not caught."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from wmbench.cache import load_weights
from wmbench.safe_io import read_bytes, safetensors_metadata, write_atomic

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """Where a fit continues: the next epoch to run and the seconds the finished ones took."""

    epoch: int
    epoch_seconds: list[float]


@dataclass
class EpochCheckpoints:
    """The checkpoints of one training in ``directory``; ``fingerprint`` names the training and
    what its float results depend on, and must match for a checkpoint to be used."""

    directory: Path
    fingerprint: dict[str, Any]
    # The training's device: on CUDA its generator (dropout) is saved and restored, that device's
    # own, not the current device's (torch.cuda.get_rng_state's default: cuda:0 for a cuda:1 run).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _last_write: float = field(default_factory=time.monotonic)
    # At most one write per this many seconds, but always after a fit's last epoch: an epoch of a
    # few milliseconds (tests, tiny data) is not worth a file.
    min_interval_s: ClassVar[float] = 60.0

    def path(self, fit_index: int) -> Path:
        return self.directory / f"fit{fit_index}.safetensors"

    def save(
        self, fit_index: int, epoch: int, epochs: int, epoch_seconds: list[float],
        model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
        step_state: dict[str, Tensor | torch.Generator],
    ) -> None:
        """Store the state after ``epoch`` (1-based) of ``epochs``, unless one was written less than
        ``min_interval_s`` ago and this is not the fit's last epoch."""
        if epoch < epochs and time.monotonic() - self._last_write < self.min_interval_s:
            return
        tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for name, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name!r} is not a tensor")
                tensors[f"optim/{i}/{name}"] = value.detach().cpu().contiguous().clone()
        for name, value in step_state.items():
            tensors[f"step/{name}"] = value.get_state() if isinstance(value, torch.Generator) else value.detach().cpu().contiguous().clone()
        tensors["rng/trainer"] = generator.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        progress = {"fingerprint": self.fingerprint, "fit": fit_index, "epoch": epoch, "epochs": epochs, "epoch_seconds": epoch_seconds}
        text = json.dumps(progress, sort_keys=True)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.path(fit_index), save(tensors, metadata={"progress": text, "sha256": checkpoint_digest(text, tensors)}), 0o600)
        except OSError as exc:  # a full disk costs the checkpoint, not the training
            log.warning("epoch checkpoint not written (%s): a stop now would train this fit again from its start", exc)
        self._last_write = time.monotonic()

    def restore(
        self, fit_index: int, epochs: int, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
        step_state: dict[str, Tensor | torch.Generator],
    ) -> Resumed | None:
        """Load the fit's checkpoint into ``model``, ``optimizer`` and the generators; None (and
        nothing changed) when there is none usable."""
        path = self.path(fit_index)
        if not path.is_file():
            return None
        try:
            data = read_bytes(path)
            metadata = safetensors_metadata(data)
            text = metadata["progress"]
            progress = json.loads(text)
            tensors = load(data)
        except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as exc:
            return self._set_aside(path, f"unreadable: {type(exc).__name__}")
        if metadata.get("sha256") != checkpoint_digest(text, tensors):
            return self._set_aside(path, "edited or damaged since it was written: its SHA-256 does not match" if "sha256" in metadata
                                   else "it has no SHA-256 (written by an older wmbench?)")
        if not isinstance(progress, dict) or not isinstance(progress.get("fingerprint"), dict):
            return self._set_aside(path, "no progress record")
        theirs = progress["fingerprint"]
        if theirs.get("train_id") != self.fingerprint.get("train_id") or progress.get("fit") != fit_index or progress.get("epochs") != epochs:
            return self._set_aside(path, f"it is another training's or fit's (training {theirs.get('train_id')!r}, fit {progress.get('fit')!r} of "
                                         f"{progress.get('epochs')!r} epochs; this is {self.fingerprint.get('train_id')!r}, fit {fit_index} of {epochs})")
        if theirs != self.fingerprint:  # this training, made under other threads, device, version or data: kept, overwritten by this run's
            changed = sorted(k for k in {*theirs, *self.fingerprint} if theirs.get(k) != self.fingerprint.get(k))
            log.warning("epoch checkpoint %s not used (made under another %s): this fit trains from its start", path, ", ".join(changed))
            return None
        state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optim = []  # (parameter index, state name, value)
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, i, name = key.split("/", 2)
                optim.append((int(i), name, value))
        if not _fits(state, model.state_dict()) or any(i >= len(params) for i, _, _ in optim):
            return self._set_aside(path, "its weights or optimiser state do not fit this training's model")
        if {k.removeprefix("step/") for k in tensors if k.startswith("step/")} != set(step_state):
            return self._set_aside(path, "its step state is not this method's")
        problem = _progress_problem(progress, epochs) or _state_problem(tensors, state, generator, step_state, self.device)
        if problem:  # damaged: set aside (a rerun would stop on it again) and train this fit from its start
            return self._set_aside(path, problem)
        load_weights(model, state)
        for i, name, value in optim:
            optimizer.state[params[i]][name] = value.to(params[i].device)
        for name, value in step_state.items():
            if isinstance(value, torch.Generator):
                value.set_state(tensors[f"step/{name}"])
            else:
                value.copy_(tensors[f"step/{name}"])
        generator.set_state(tensors["rng/trainer"])
        torch.set_rng_state(tensors["rng/torch"])
        if "rng/cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        return Resumed(int(progress["epoch"]), [float(s) for s in progress["epoch_seconds"]])

    @staticmethod
    def _set_aside(path: Path, problem: str) -> None:
        """Move an unusable checkpoint out of the way (``.damaged``), saying why; None: train the fit
        from its start."""
        log.warning("epoch checkpoint %s set aside (%s): this fit trains from its start", path, problem)
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(f"{path.name}.damaged"))
        return None

    def clear(self) -> None:
        """Remove the training's checkpoints (once it is stored whole)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def checkpoint_digest(progress: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 of a checkpoint's progress record (its JSON text) and of every tensor (name, dtype,
    shape, bytes), in name order: written into its metadata, checked before it is used."""
    digest = hashlib.sha256(progress.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _progress_problem(progress: Any, epochs: int) -> str | None:
    """Why a checkpoint's progress record cannot be used, or None: an epoch outside the fit's
    schedule, or beyond the epochs it has timed (its training's, earlier fits included)."""
    epoch, seconds = progress.get("epoch"), progress.get("epoch_seconds")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        return f"epoch {epoch!r} is not in [1, {epochs}]"
    if not isinstance(seconds, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in seconds):
        return "epoch_seconds is not a list of numbers"
    if len(seconds) < epoch:
        return f"epoch {epoch} after {len(seconds)} timed epochs"
    return None


def _state_problem(
    tensors: dict[str, Tensor], state: dict[str, Tensor], generator: torch.Generator, step_state: dict[str, Tensor | torch.Generator], device: torch.device,
) -> str | None:
    """Why a checkpoint's tensors cannot be restored, or None (checked before anything is changed)."""
    rng = {"rng/trainer": generator.get_state(), "rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["rng/cuda"] = torch.cuda.get_rng_state(device)
    rng.update({f"step/{k}": v.get_state() if isinstance(v, torch.Generator) else v for k, v in step_state.items()})
    for name, current in rng.items():
        if name not in tensors or tensors[name].shape != current.shape or tensors[name].dtype != current.dtype:
            return f"{name} is missing or of another shape"
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    return f"non-finite values in {broken}" if broken else None


def _fits(state: dict[str, Tensor], expected: dict[str, Tensor]) -> bool:
    """Whether ``state`` has exactly the names and shapes of the model's own state."""
    return state.keys() == expected.keys() and all(state[k].shape == expected[k].shape for k in state)
