"""The plug-in contracts: Method, Attack, and the values they exchange (Key, Detection, Carriers)."""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Union

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save
from torch import Tensor, nn

from wmbench.errors import NotApplicable, UnstorableKey
from wmbench.seeding import derived_seed

if TYPE_CHECKING:
    from wmbench.data import DataBundle
    from wmbench.train import Trainer, TrainingConfig

LossFn = Callable[[Tensor, Tensor], Tensor]
StepFn = Callable[[nn.Module, tuple[Tensor, Tensor], LossFn, torch.optim.Optimizer], Tensor]

# Carriers: parameter name -> flat indices (into param.view(-1)) of the weights that hold the mark.
Carriers = dict[str, Tensor]


@dataclass
class StatefulStep:
    """A training step with state of its own between calls (a step counter, a noise generator,
    running means), named so that epoch checkpoints save it and restore it: tensors in place,
    generators by their state. A method whose step keeps state returns one from ``step_fn`` and can
    then set ``Method.resumable`` True."""

    step: StepFn
    state: dict[str, Tensor | torch.Generator]

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> Tensor:
        return self.step(model, batch, loss_fn, optimizer)


@dataclass
class Key:
    """A method's secret: tensors (positions, the mark) and JSON-able facts (method, layer names)."""

    method: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def problem(self) -> str | None:
        """Why this key cannot be written to its file, or None: ``tensors`` must map names to dense
        torch tensors, ``meta`` hold what JSON writes (``json_value``'s conversions included)."""
        if not isinstance(self.tensors, dict):
            return f"key.tensors is a {type(self.tensors).__name__}, not a dict of name -> torch.Tensor"
        for name, value in self.tensors.items():
            if not isinstance(name, str):
                return f"key.tensors has a name {name!r} that is not a string"
            entry = f"key.tensors[{name!r}]"
            if isinstance(value, np.ndarray):
                return f"{entry} is a numpy.ndarray, not a torch.Tensor: store torch.from_numpy(array)"
            if not isinstance(value, torch.Tensor):
                return (f"{entry} is a {type(value).__name__}, not a torch.Tensor: key.tensors holds tensors only "
                        "(strings, numbers, lists and dicts go in key.meta)")
            if value.layout != torch.strided or value.is_nested:
                return f"{entry} is a sparse tensor ({value.layout}): store value.to_dense()"
        try:
            json.dumps(self.meta, default=json_value)
        except (TypeError, ValueError) as exc:
            return f"key.meta cannot be written as JSON ({exc}): keep numbers, strings, lists and dicts there, and tensors in key.tensors"
        return None

    def save(self, path: str | Path) -> None:
        """Write as safetensors, created with permissions 0600 (atomic: temp file, fsync, rename);
        ``UnstorableKey`` for a key that ``problem`` refuses. Tensors are copied, so one stored under
        two names (an alias, which safetensors refuses as shared memory) is written twice."""
        from wmbench.safe_io import write_atomic

        problem = self.problem()
        if problem:
            raise UnstorableKey(f"the key of method {self.method!r} cannot be stored: {problem}")
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.tensors.items()}
        if not tensors:
            tensors = {"_empty": torch.zeros(0)}
        meta = json.dumps(self.meta, default=json_value)
        write_atomic(Path(path), st_save(tensors, metadata={"method": self.method, "meta": meta}), 0o600)

    @classmethod
    def load(cls, path: str | Path) -> "Key":
        """Read a key file (safetensors with JSON metadata; never a pickle)."""
        with open(path, "rb") as fh:
            raw = fh.read()
        tensors = st_load(raw)
        metadata = _safetensors_metadata(raw)
        tensors.pop("_empty", None)
        meta = json.loads(metadata.get("meta", "{}"))
        if not isinstance(meta, dict):
            raise ValueError("the key's metadata is not a JSON object")
        return cls(metadata.get("method", "?"), tensors, meta)


def json_value(value: Any) -> Any:
    """A component argument JSON cannot write, as the YAML value that builds it again (``Path``: its
    text, ``Enum``: its member's name, a set: a list sorted by its items' JSON, the same in every
    process, a numpy scalar: its Python number); ``json.dumps``'s ``default`` for key meta and, through ``wmbench.cache``, cell ids."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=lambda item: json.dumps(item, sort_keys=True, default=json_value))
    if isinstance(value, np.generic):  # a numpy scalar (np.int64 from a count): its Python value
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    return header.get("__metadata__") or {}


@dataclass(frozen=True)
class Detection:
    """Outcome of a detector: its statistic, the p-value of an unwatermarked model scoring as high."""

    stat: float
    pvalue: float
    # log10 of the p-value, finite where ``pvalue`` underflows to 0 (built-in detectors compute it
    # from the log tail); left out, it is log10(pvalue).
    log10_pvalue: float | None = None

    def __post_init__(self) -> None:
        # A plug-in may hand back 0-d tensors or numpy scalars: rows must hold plain floats.
        stat, p = _number(self.stat, "statistic"), _number(self.pvalue, "p-value")
        if not 0.0 <= p <= 1.0:  # NaN included: a broken detector must fail its cell, not read "not detected"
            raise ValueError(f"Detection p-value must lie in [0, 1], got {p}")
        if not math.isfinite(stat):
            raise ValueError(f"Detection statistic must be finite, got {stat}")
        log10_p = None if self.log10_pvalue is None else float(self.log10_pvalue)
        if log10_p is None:
            log10_p = math.log10(p) if p > 0 else -math.inf
        elif not _agrees(log10_p, p):
            raise ValueError(f"Detection log10_pvalue {log10_p} does not match the p-value {p}")
        object.__setattr__(self, "stat", stat)
        object.__setattr__(self, "pvalue", p)
        object.__setattr__(self, "log10_pvalue", log10_p)

    def detected(self, threshold: float) -> bool:
        return self.pvalue < threshold


def _number(value: Any, what: str) -> float:
    """``value`` (a number, numpy scalar or one-element tensor, detached) as a float; a bool is
    refused: ``Detection(stat, pvalue < 0.01)`` would read the verdict True as p = 1, not detected."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            value = bool(value)
        else:
            return float(value.detach())
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Detection {what} is a bool, not a number ({value}): pass the {what} itself "
                        "(wmbench compares the p-value with the scenario's threshold for the verdict)")
    return float(value)


# A p-value computed as 1 - cdf in float64 is off by up to a few ulps of 1: its smallest non-zero
# value is 2^-53 (1.1e-16), below which it reads 0. Where its log10 comes from an accurate tail, the
# two differ by that much.
_ONE_MINUS_CDF = 1e-15
_LOG10_MIN_NORMAL = math.log10(sys.float_info.min)  # -307.65: below, a float64 p-value has few digits or none


def _agrees(log10_p: float, p: float) -> bool:
    """Whether a detector's log10 p-value can be that of ``p``, compared in log space: <= 0, and
    within 0.01 of log10(p) (2.3%) where ``p`` is a normal float. Beside that, where ``p`` can be a
    1 - cdf computed in double precision (0, or at least 2^-54), 10^log10_p within 1e-15 of it (the
    digits 1 - cdf loses); where ``p`` is subnormal, any log10 p below the normal range, and where it
    is 0, any below 1 - cdf's resolution (underflowed, or a perfect match reported as 0). The
    allowance for 1 - cdf was 1e-15 / p decades, which below p = 1e-13 let any log10 p <= 0 pass:
    a p-value of 1e-20 (detected) beside a log10 p of -1 (not)."""
    if math.isnan(log10_p) or log10_p > 0:
        return False
    if p >= sys.float_info.min:
        if abs(log10_p - math.log10(p)) <= 0.01:
            return True
        return p >= 2.0**-54 and abs(p - 10.0**log10_p) <= _ONE_MINUS_CDF
    if p > 0:
        return log10_p <= _LOG10_MIN_NORMAL + 0.01
    return 10.0**log10_p <= _ONE_MINUS_CDF


# How a long job reports progress: True, a tqdm bar; "lines", one line per epoch on stderr (for
# workers whose output is forwarded line by line, as Ray's are); False, nothing.
Progress = Union[bool, Literal["lines"]]


def detect_only(default: Any) -> Any:
    """A method field that changes detection only: it is left out of the training-cache hash."""
    return field(default=default, metadata={"detect_only": True})


def location(default: Any) -> Any:
    """A dataset field that says where the data is read from (a path), not what it is: left out of
    the cell ids, so a copy of the same data elsewhere keeps them (a results store resumes on any
    machine). The decoded data's digest guards the cache instead (``DataBundle.digest``)."""
    return field(default=default, metadata={"location": True})


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: ``ge <= x <= le``, ``gt < x < lt`` (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or None (every element of a list is checked)."""
        if isinstance(value, (list, tuple)):
            return next((p for p in map(self.problem, value) if p), None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            return f"expected a finite number {self}, got {value if isinstance(value, float) else 'a huge integer'}"
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        return None if ok else f"expected a number {self}, got {value!r}"

    def __str__(self) -> str:
        parts = [f"{op} {v if isinstance(v, int) else format(v, 'g')}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None]
        return " and ".join(parts) if parts else "(any finite value)"


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    detect: bool = False,
    added: bool = False,
) -> Any:
    """A numeric field with its accepted range, checked when a scenario loads (``--dry-run`` too)
    and shown by ``wmbench list``: ``n_carriers: int = bounded(1024, ge=1)``. Lists are checked
    element by element; ``detect=True`` also marks it ``detect_only``. ``added=True`` marks a field
    added to a released component whose default keeps the old behaviour: at its default it is left
    out of the cell ids, so stored trainings and results keep theirs (no ``version`` bump)."""
    metadata: dict[str, Any] = {"range": Range(ge, gt, le, lt)}
    if detect:
        metadata["detect_only"] = True
    if added:
        metadata["added"] = True
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Method(ABC):
    """A watermarking method: a frozen dataclass whose fields are its YAML ``args``.

    The default ``embed`` draws a key (``keygen``, which may write into the model), trains with
    ``training_step``, then lets ``finalize_key`` record what only the trained model tells.
    Methods with another schedule (embed after training, then fine-tune) override ``embed``.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    # Bump instead of ``version`` when only ``detect`` changes (its statistic or its p-value): the
    # stored attack cells re-run, the trainings stay cached.
    detect_version: ClassVar[str] = "1"
    # What ``detect`` reports as its statistic, for the leaderboard: a key of
    # wmbench.statistic_kinds.STATISTICS ("pearson_r", "bit_accuracy", "z_score"); "" when none
    # (checked at registration). Whatever it is, larger must mean more likely watermarked: `wmbench
    # null` places its empirical cutoffs on the statistic that way.
    statistic: ClassVar[str] = ""
    # Args that change the key but not the training (``none``'s carriers: it never writes them).
    # Every value of these args shares one trained model, stored under the id of their defaults;
    # the key is drawn again, from the freshly built model, for each cell that asks for it.
    key_only_args: ClassVar[frozenset[str]] = frozenset()
    # Whether a stopped training may continue from its last epoch checkpoint (wmbench.checkpoint).
    # Say True only when everything the next step depends on is in the model, the optimiser, the
    # trainer's generator, or the ``state`` of a ``StatefulStep`` that ``step_fn`` returns: a
    # resumed training then ends bit-identical to one never stopped. A step closure with hidden
    # state (a counter in a list, a generator) would not; False (the default) starts it over.
    resumable: ClassVar[bool] = False

    def embed(self, model: nn.Module, trainer: "Trainer", rng: torch.Generator) -> Key:
        """Watermark ``model`` while training it; returns the secret key."""
        key = self.keygen(model, trainer.data, rng)
        model.to(trainer.device)
        trainer.fit(model, self.step_fn(model, key))
        return self.finalize_key(model, key)

    def step_fn(self, model: nn.Module, key: Key) -> "StepFn":
        """The training step bound to ``model`` and ``key`` for a whole training. Override it to
        prepare per-training state once (positions on the device, masks); default: ``training_step``.
        The step is called with the module to run: ``model`` itself or, under the fast path's
        ``compile``, its ``torch.compile`` wrapper, whose tensors and layers are named
        ``_orig_mod.<name>``: look them up by name on ``model`` (here, or in the step's closure),
        not on the module the step is given."""
        return lambda m, batch, loss_fn, opt: self.training_step(m, batch, loss_fn, opt, key)

    @abstractmethod
    def keygen(self, model: nn.Module, data: "DataBundle", rng: torch.Generator) -> Key:
        """Draw the secret key; substitutive methods also write the mark into ``model``."""

    def training_step(
        self, model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer, key: Key
    ) -> Tensor:
        """One optimisation step; the default is a plain step. Returns the task loss. Methods that
        override ``step_fn`` route this through it."""
        return plain_step(model, batch, loss_fn, optimizer)

    def finalize_key(self, model: nn.Module, key: Key) -> Key:
        """Complete the key after training (default: unchanged)."""
        return key

    @abstractmethod
    def extract(self, model: nn.Module, key: Key) -> Tensor:
        """Read the mark out of ``model`` at the key's positions."""

    @abstractmethod
    def detect(self, model: nn.Module, key: Key) -> Detection:
        """Statistic and p-value; raises NotApplicable when the model no longer fits the key."""

    @abstractmethod
    def carriers(self, key: Key) -> Carriers:
        """What a key-leak attacker learns: the weight positions that hold the mark."""

    def remove(self, model: nn.Module, key: Key, count: int, rng: torch.Generator) -> bool:
        """A key-aware removal of the method's own, applied in place; False where it has none."""
        return False


def keyed_tensor(named: dict[str, Tensor], name: str, shape: list[int]) -> Tensor:
    """``named[name]`` (a model's ``named_parameters()`` as a dict) when it has the shape the key
    recorded; NotApplicable otherwise (an attack removed or reshaped it: the row says so)."""
    p = named.get(name)
    if p is None:
        raise NotApplicable(f"key expects {name} of shape {shape}, the model has no tensor of that name")
    if list(p.shape) != list(shape):
        raise NotApplicable(f"key expects {name} of shape {shape}, the model's has shape {list(p.shape)}")
    return p


def plain_step(model: nn.Module, batch: tuple[Tensor, Tensor], loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> Tensor:
    """Forward, backward and optimiser step on one batch; returns the loss."""
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class AttackContext:
    """What an attacker may use besides the model: data, training settings, an RNG, maybe the key.

    Attacks record what they actually did in ``effect`` (a number, e.g. the sparsity reached) and
    anything the detector should know in ``notes``.
    """

    data: "DataBundle"
    rng: torch.Generator
    device: torch.device
    method: Method | None = None
    key: Key | None = None
    progress: Progress = True  # how long attacks (fine-tuning) report progress
    effect: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    training: "TrainingConfig | None" = None  # the scenario's; its fast path serves retraining attacks
    attack_seed: int | None = None  # from the cell's seed and the attack's name, not its label nor the strength: ``strength_free_seed``

    def strength_free_seed(self, *parts: Any) -> int:
        """A seed for what an attacker makes once and uses at every strength, against every method's
        model (a thief's own model): drawn from ``attack_seed`` (the cell's seed and the attack's
        name: the scenario's entries of one attack, e.g. an arm and its control, draw the same) and
        ``parts``, not from the strength, whereas ``rng`` is seeded from the seed, label and strength. A
        context built without ``attack_seed`` (by hand, in a test) uses ``rng``'s initial seed."""
        base = self.rng.initial_seed() if self.attack_seed is None else self.attack_seed
        return derived_seed("strength-free", base, *parts)

    def retraining(self, **settings: Any) -> "TrainingConfig":
        """A training configuration for an attack's own training (``settings``: epochs, lr, ...),
        run on the scenario's fast path (memory format, precision, compile: how fast the steps
        run, not what they learn), so a fine-tune on a bf16 GPU scenario runs in bf16 too."""
        from wmbench.train import TrainingConfig, on_fast_path_of

        return on_fast_path_of(TrainingConfig(**settings), self.training)


class Attack(ABC):
    """A removal attack: a frozen dataclass whose fields are its YAML ``args``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    untouched_effect: ClassVar[float] = 0.0  # the effect of strength 0, the untouched model (1.0 for an agreement)

    def apply(self, model: nn.Module, strength: float, ctx: AttackContext) -> nn.Module:
        """The attacked model, always a copy; strength 0 returns an untouched copy. Every parameter
        of the copy is trainable: ``requires_grad`` is the owner's training choice, not part of the
        weights a thief holds, so fine-tuning and distillation train frozen layers too."""
        attacked = copy.deepcopy(model).requires_grad_(True)
        if strength == 0:
            ctx.effect = self.untouched_effect if ctx.effect is None else ctx.effect
            return attacked
        result = self.attack(attacked, float(strength), ctx)
        return attacked if result is None else result

    def check_strength(self, strength: float) -> str | None:
        """Why ``strength`` (> 0) is out of this attack's range, or None; checked at scenario load."""
        return None if math.isfinite(strength) and strength >= 0 else "expected a finite number >= 0"

    @abstractmethod
    def attack(self, model: nn.Module, strength: float, ctx: AttackContext) -> nn.Module | None:
        """Attack ``model`` (already a copy) in place, or return a new module."""


def overrides_apply(attack: Attack) -> bool:
    """Whether ``attack`` (a plug-in) overrides ``Attack.apply`` rather than only ``attack``."""
    return type(attack).apply is not Attack.apply


def apply_attack(attack: Attack, model: nn.Module, strength: float, ctx: AttackContext) -> nn.Module:
    """``attack.apply(model, strength, ctx)`` as a cell runs it: ``model`` is left untouched (an
    attack overriding ``apply`` gets its own copy, since it might edit it in place), gradients are
    on (a plug-in switching them off leaves them on after it), and the result must be an
    ``nn.Module``. Strength 0 is an untouched copy for every attack, one overriding ``apply``
    included (not called: the strength-0 rows of all attacks are pooled as the clean figures). A
    chain runs its elements that override ``apply`` this way too."""
    if strength == 0:
        return Attack.apply(attack, model, 0.0, ctx)
    source = copy.deepcopy(model) if overrides_apply(attack) else model
    with torch.enable_grad():
        attacked = attack.apply(source, strength, ctx)
    if not isinstance(attacked, nn.Module):
        raise TypeError(f"{type(attack).__name__} returned {type(attacked).__name__}, not the attacked torch.nn.Module")
    return attacked


def field_default(f: "dataclasses.Field[Any]") -> Any:
    """A dataclass field's default value (its factory's, for a list or dict)."""
    return f.default_factory() if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING else f.default


def component_config(obj: Any) -> dict[str, Any]:
    """The fields of a component dataclass, with ``detect_only`` fields split off under 'detect';
    an ``added`` field (``bounded(added=True)``) only when it is not at its default; no
    ``location`` field."""
    train, detect = {}, {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("location") or f.metadata.get("added") and value == field_default(f):
            continue
        (detect if f.metadata.get("detect_only") else train)[f.name] = value
    return {"name": obj.name, "version": obj.version, "args": train, "detect": detect}
