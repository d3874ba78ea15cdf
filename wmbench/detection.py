"""Detection of one suspect model, optionally resynchronised onto the owner's model first."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from wmbench.api import Carriers, Detection, Key, Method
from wmbench.errors import RESYNC_FAILED_NOTE, UNREADABLE_NOTE, NotApplicable, machine_fault
from wmbench.names import shown
from wmbench.statistic_kinds import STATISTIC_RANGES, STATISTICS
from wmbench.warn_once import Once

log = logging.getLogger(__name__)


def detect(
    method: Method, model: torch.nn.Module, key: Key, threshold: float, reference: torch.nn.Module | None = None, example: torch.Tensor | None = None
) -> tuple[float | None, float | None, float | None, bool | None, str | None]:
    """(stat, p-value, log10 p-value, detected, note); a model that no longer fits the key gives a
    note instead. With a ``reference`` (the owner's model) and an ``example`` input batch, the
    suspect is first resynchronised onto the reference's units (wmbench.resync), whatever the method."""
    carriers = method_carriers(method, key)
    model, note = unwrapped(model, carriers)
    if reference is not None:
        from wmbench.resync import resync

        try:
            if example is None:
                raise ValueError("resync needs an example input batch")
            partial: list[str] = []
            model = resync(model, reference, example, carriers, notes=partial)
            if partial:  # units not matched, only the rescaling undone (RESYNC_PARTIAL_NOTE)
                note = "; ".join(filter(None, [note, *partial]))
        except Exception as exc:  # noqa: BLE001 - graph analysis of an odd model: fall back to plain detection, say so
            if machine_fault(exc):  # a full disk is the machine's, not the model's: it stops the run
                raise
            note = "; ".join(filter(None, [note, f"{RESYNC_FAILED_NOTE} ({type(exc).__name__}: {exc}); plain detection"]))
    try:
        result = method.detect(model, key)
    except NotApplicable as exc:
        return None, None, None, None, f"{UNREADABLE_NOTE}: {exc}" + (f"; {note}" if note else "")
    if not isinstance(result, Detection):
        raise TypeError(f"{type(method).__name__}.detect returned {type(result).__name__}, not a wmbench.api.Detection")
    problem = direction_problem(method, result, threshold)
    if problem:
        raise ValueError(problem)
    note = "; ".join(filter(None, [note, ceiling_note(method, result, threshold)])) or None
    return result.stat, result.pvalue, result.log10_pvalue, result.detected(threshold), note


def ceiling_note(method: Method, result: Detection, threshold: float) -> str | None:
    """Why a detection at its declared statistic's maximum (bit accuracy 1, Pearson r 1) is still
    "not detected": its p-value, the smallest the key allows, is not below ``threshold`` (12 bits
    give 2^-12); None otherwise. Such a row would read as the mark's failure."""
    kind = getattr(method, "statistic", "")
    if kind not in STATISTICS or result.detected(threshold) or result.stat < STATISTIC_RANGES[kind][1]:
        return None
    return (f"{STATISTICS[kind][0]} {result.stat:.4g} is the most it can read, yet p = {result.pvalue:.3g} is not below the "
            f"threshold {threshold:g}: this key cannot be detected at this threshold (too few bits for it)")


def direction_problem(method: Method, result: Detection, threshold: float) -> str | None:
    """Why ``result`` breaks the contract that a larger statistic means more likely watermarked, or
    None: a detection (p-value below ``threshold`` and below 1/2) whose statistic reads below the
    value its declared ``statistic`` takes for no watermark (a bit-error rate declared as bit
    accuracy, or a two-sided test of Pearson r). A one-sided test of a larger-is-marked statistic
    never gives both (its p-value is at least 1/2 there, which a ``threshold`` above 1/2 calls
    detected); such a row would read "detected" beside a statistic that says the opposite, and
    ``wmbench null`` would place its empirical cutoffs the wrong way round."""
    kind = getattr(method, "statistic", "")
    if kind not in STATISTICS or not result.detected(min(threshold, 0.5)):
        return None
    label, null = STATISTICS[kind]
    if result.stat >= null:
        return None
    return (f"{type(method).__name__}.detect reports {label} {result.stat:.4g} with p-value {result.pvalue:.3g}, below {null:g}, "
            f"the value of no watermark: larger must mean more likely watermarked (Method.statistic; "
            f"report e.g. 1 - a bit-error rate)")


def unwrapped(model: torch.nn.Module, carriers: Carriers) -> tuple[torch.nn.Module, str | None]:
    """The submodule of ``model`` that holds the key's carrier tensors under their own names, when
    ``model`` holds them only under a prefix (a thief's wrapper, ``torch.compile``'s ``_orig_mod.``,
    ``DataParallel``'s ``module.``), with a note saying so; else ``model`` itself (with a note when
    several submodules would fit: none is chosen)."""
    names = set(carriers)
    state = model.state_dict(keep_vars=True)
    if not names or names <= set(state):
        return model, None
    prefixes: set[str] | None = None
    for name in names:
        found = {full[: -len(name) - 1] for full in state if full.endswith("." + name)}
        prefixes = found if prefixes is None else prefixes & found
    fitting = []
    for prefix in sorted(prefixes or ()):
        try:
            inner = model.get_submodule(prefix)
        except AttributeError:  # a prefix that is not a module's path
            continue
        if carriers_problem(carriers, inner.state_dict()) is None:  # every carrier position inside its tensor
            fitting.append((prefix, inner))
    if len(fitting) == 1:
        prefix, inner = fitting[0]
        return inner, f"the key's tensors found under {prefix!r}: detected in that submodule"
    if fitting:
        return model, f"the key's tensors fit under {len(fitting)} prefixes ({', '.join(repr(p) for p, _ in fitting)}): none chosen"
    return model, None


_CARRIERS_RAISED = Once()  # methods whose carriers() raised, warned about once per process


def method_carriers(method: Method, key: Key) -> Carriers:
    """The key's carriers, left out of the resynchronisation's similarity. carriers() is optional
    for a plug-in: NotImplementedError means none, silently; any other exception (a bug of the
    method's) means none too, with a warning, once per method; a machine fault is raised.
    ``wmbench detect`` reads them by ``ownership.check_key`` instead, which refuses such a key."""
    try:
        return method.carriers(key)
    except NotImplementedError:
        return {}
    except Exception as exc:  # noqa: BLE001 - a plug-in's bug must not stop its detection
        if machine_fault(exc):  # a full disk, an I/O error: the machine's, it stops the run
            raise
        name = str(getattr(method, "name", type(method).__name__))
        if _CARRIERS_RAISED.first(name):
            log.warning("method %s: carriers() raised %s: %s; detection goes on with no carrier known "
                        "(resync matches every unit without leaving the mark's out, a wrapped model is not unwrapped)",
                        name, type(exc).__name__, " ".join(str(exc).split())[:300])
        return {}


def carriers_problem(carriers: Carriers, state: dict[str, torch.Tensor]) -> str | None:
    """Why a key's carriers cannot be positions in ``state`` (a tensor it lacks, float or
    out-of-range indices: a negative one would wrap to the tensor's end), or None."""
    contract = "carriers() must return a dict of tensor name -> 1-D integer torch.Tensor of flat positions"
    if not isinstance(carriers, Mapping):
        return f"{contract}, not a {type(carriers).__name__}"
    for name, idx in carriers.items():
        if not isinstance(name, str) or not isinstance(idx, torch.Tensor):
            return f"{contract}; it holds {shown(name)}: {type(idx).__name__}"
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            return f"{contract}; {name!r} is a {idx.dim()}-D {idx.dtype} tensor"
        if name not in state:
            return f"it names a tensor {name!r} the model lacks"
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= state[name].numel()):
            return f"positions outside {name} ({state[name].numel()} weights)"
    return None

