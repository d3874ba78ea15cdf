"""For model owners: write a watermarked model and its key (``wmbench embed``), and test a suspect
model for the mark (``wmbench detect``). Only safetensors files are read; a key names its model
by registry name, so no code is ever loaded from a key or a model file (reading the suspect file:
``wmbench.suspect_file``)."""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wmbench.api import Carriers, Detection, Key, Method, component_config
from wmbench.cache import save_state
from wmbench.data import DataBundle
from wmbench.detection import carriers_problem, direction_problem
from wmbench.errors import CellFailed, ConfigError, NotApplicable, WmbenchError, machine_fault
from wmbench.grid import TrainCell, expand
from wmbench.image_mark import NAN_MEANS_NONE
from wmbench.key_record import data_record_problem
from wmbench.names import not_a_folder
from wmbench.registry import METHODS, MODELS, closest, load_plugins
from wmbench.rows import cell_name, failure_text
from wmbench.safe_io import probe_writable, special_file
from wmbench.scenario import Scenario
from wmbench.suspect_file import check_shapes, load_suspect, suspect_shapes
from wmbench.worker import CellWorker

log = logging.getLogger(__name__)
MAX_KEY_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Verdict:
    """The outcome of ``wmbench detect``."""

    method: str
    align: bool | None
    stat: float
    pvalue: float
    threshold: float
    resync: bool = False
    log10_pvalue: float = math.nan  # finite where the p-value underflows to 0

    @property
    def detected(self) -> bool:
        return self.pvalue < self.threshold  # False for a NaN p-value

    def as_dict(self) -> dict[str, Any]:
        finite = lambda x: x if math.isfinite(x) else None  # noqa: E731  (JSON has no NaN)
        return {
            "method": self.method, "align": self.align, "statistic": finite(self.stat),
            "p_value": finite(self.pvalue), "log10_p_value": finite(self.log10_pvalue), "threshold": self.threshold,
            "detected": self.detected, "resync": self.resync,
        }


def select_cell(scenario: Scenario, method: str | None = None, model: str | None = None, dataset: str | None = None, seed: int | None = None) -> TrainCell:
    """The training cell chosen by labels; defaults: the first watermarking method (not ``none``),
    the first seed, and the grid's first model and dataset that pair with what is given (a model
    entry may name the datasets it runs on)."""
    if method is None:
        marks = [m.label for m in scenario.methods if m.obj.name != "none"]
        method = marks[0] if marks else scenario.methods[0].label
    wanted = {
        "--method": (method, [m.label for m in scenario.methods]),
        "--model": (model, [m.label for m in scenario.models]),
        "--dataset": (dataset, [d.label for d in scenario.datasets]),
    }
    for option, (label, labels) in wanted.items():
        if label is not None and label not in labels:
            raise ConfigError(option, f"no entry labelled {label!r} in the scenario{closest(label, labels)}")
    seed = scenario.seeds[0] if seed is None else seed
    if seed not in scenario.seeds:
        raise ConfigError("--seed", f"seed {seed} is not among the scenario's seeds {list(scenario.seeds)}")
    for cell in expand(scenario):
        if (cell.method.label, cell.seed) == (method, seed) and model in (None, cell.model.label) and dataset in (None, cell.dataset.label):
            return cell
    pairs = sorted({(c.model.label, c.dataset.label) for c in expand(scenario) if c.method.label == method})
    raise ConfigError("--dataset" if dataset is not None else "--model",
                      f"the scenario runs no {method!r} training of model {model or 'any'!r} on dataset {dataset or 'any'!r}; "
                      f"its (model, dataset) pairs: {', '.join(f'{m} / {d}' for m, d in pairs) or 'none'}")


def embed(
    cell: TrainCell, worker: CellWorker, out_model: Path, out_key: Path, force: bool = False, reproducible_seed: int | None = None
) -> tuple[dict[str, Any], Verdict]:
    """Train ``cell``, write its model (safetensors) and key (0600); returns the training meta and
    the detection of the mark in the written model.

    The key's generator (positions, image order, signature bits, trigger images) is seeded from
    the operating system's randomness (``secrets``), so nobody holding the scenario can regenerate
    the key; such a training is never cached (the secret stays out of the cache). With
    ``reproducible_seed`` it is seeded with that number instead and cached under it."""
    check_distinct(out_model, out_key)
    for path in (out_model, out_key):
        if path.exists() and not force:
            raise WmbenchError(f"{path} exists (a key is an owner's proof: pass --force to overwrite)")
        if (path.exists() and not path.is_file()) or path.is_symlink():  # --force replaces files, never a device or a link's target
            raise WmbenchError(f"{path} is not a regular file: write the model and key elsewhere")
        if not path.parent.is_dir():  # checked before training: a key that cannot be written is lost for good
            blocker = not_a_folder(path.parent)  # a file (or a dangling link) in the way, else a folder not made
            raise WmbenchError(f"{path.parent}: no such directory" if blocker is None else f"{path}: {blocker} is not a directory")
        probe_writable(path.parent)  # a read-only folder too (exit 4): an os_random training is not cached
    if reproducible_seed is not None and not 0 <= reproducible_seed <= MAX_KEY_SEED:  # torch's generators take 64 bits: checked before the training
        raise WmbenchError(f"--reproducible-seed must be in [0, 2^64 - 1], got {reproducible_seed}")
    try:
        if reproducible_seed is None:
            model, key, meta = worker.trained(cell, key_seed=secrets.randbits(63), cache=False)
        else:
            model, key, meta = worker.trained(cell, key_seed=reproducible_seed)
    except Exception as exc:  # a plug-in's bug: one line, as a grid's failure column says it
        if isinstance(exc, WmbenchError) or machine_fault(exc):
            raise
        raise CellFailed(f"{cell_name(cell)}: {failure_text('training', exc)}") from exc
    key.meta["key_source"] = "os_random" if reproducible_seed is None else {"reproducible_seed": reproducible_seed}
    config = component_config(cell.method.obj)
    key.meta["method"] = {"name": config["name"], "version": config["version"], "args": config["args"], "detect": config["detect"]}
    save_state(model, out_model)
    try:
        key.save(out_key)
        return meta, detect(out_model, out_key, threshold=worker.scenario.detection.threshold)
    except BaseException:  # a model without its key proves nothing; a pair detect cannot read, neither
        out_model.unlink(missing_ok=True)
        out_key.unlink(missing_ok=True)
        raise


def check_distinct(out_model: Path, out_key: Path) -> None:
    """Refuse one path (or two names of one file) for both outputs, before anything is written."""
    same = Path(out_model).resolve() == Path(out_key).resolve()
    if not same and Path(out_model).exists() and Path(out_key).exists():
        same = Path(out_model).samefile(out_key)
    if same:
        raise WmbenchError(f"--out-model and --out-key name the same file ({out_key}): the key would overwrite the model")


def detect(
    model_path: Path, key_path: Path, align: bool | None = None, threshold: float = 1e-6, plugins: list[str] | tuple[str, ...] = (), reference: Path | None = None
) -> Verdict:
    """Rebuild the architecture the key names, load the suspect weights into it (strict), and run
    the key's method's detector. ``align`` overrides the key's detection option. With a
    ``reference`` (the owner's model file), the suspect's units are first matched onto it
    (wmbench.resync): layer sizes may then differ from the key's architecture (dummy units)."""
    if not 0.0 < threshold < 1.0:
        raise WmbenchError(f"--threshold must be in (0, 1), got {threshold}")
    load_plugins(list(plugins), Path.cwd(), "--plugin")
    key = read_key(key_path)
    method = _method(key, key_path, align)
    resized = reference is not None
    model = _model(key, key_path, model_path, resized, suspect=True)
    load_suspect(model, model_path, resized)
    if reference is not None:
        from wmbench.resync import resync

        try:
            owner = _model(key, key_path, reference)
            load_suspect(owner, reference)
        except WmbenchError as exc:  # say which of the two model files it is about
            raise WmbenchError(str(exc) if str(exc).startswith(str(reference)) else f"--reference {reference}: {exc}") from None
        carriers = check_key(method, key, owner, key_path)
        example = _example_input(_record(key, key_path, "data"), key_path)
        try:
            model = resync(model.eval(), owner.eval(), example, carriers)
        except Exception as exc:  # noqa: BLE001 - graph analysis of a foreign model can fail in many ways
            raise WmbenchError(f"--resync: cannot match the suspect's units to the reference ({type(exc).__name__}: {exc})") from None
    else:
        check_key(method, key, model, key_path)
    try:
        result = method.detect(model.eval(), key)
    except NotApplicable as exc:
        raise WmbenchError(f"key does not match the model: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged key or the method's own bug: one line either way
        raise WmbenchError(f"{method.name}'s detector failed on {key_path} ({type(exc).__name__}: {exc}): a malformed key, or a bug in the method") from None
    if not isinstance(result, Detection):
        raise WmbenchError(f"{method.name}'s detector returned {type(result).__name__}, not a wmbench.api.Detection")
    problem = direction_problem(method, result, threshold)
    if problem:  # the grid fails such a cell; an owner gets no verdict either
        raise WmbenchError(problem)
    return Verdict(method.name, getattr(method, "align", None), float(result.stat), float(result.pvalue), threshold,
                   reference is not None, float(result.log10_pvalue))


def read_key(path: Path) -> Key:
    if path.is_dir():
        raise WmbenchError(f"{path}: a directory, not a key file")
    if special_file(path):  # /dev/zero, /dev/urandom, a FIFO: read without end
        raise WmbenchError(f"{path}: not a regular file (--key takes the key file written by wmbench embed)")
    try:
        key = Key.load(path)
    except FileNotFoundError:
        raise WmbenchError(f"{path}: no such key file") from None
    except Exception as exc:  # safetensors and json raise several types for damaged files
        raise WmbenchError(f"{path}: not a wmbench key file ({type(exc).__name__}: {exc})") from None
    if key.method == "?" and not key.meta:  # a safetensors file without a key's metadata: a model file?
        raise WmbenchError(f"{path}: not a wmbench key file (safetensors without a key's metadata: a model file? "
                           "--key takes the key written by wmbench embed, --model the model)")
    return key


def check_key(method: Method, key: Key, model: nn.Module, key_path: Path) -> Carriers:
    """A crafted key's positions checked against the model before detection: every carrier names a
    tensor of the model and indexes inside it (ids out of range would read nothing and say p = 1).
    Returns the carriers checked, which ``detect --resync`` leaves out of its matching.

    ``method.carriers(key)`` is read once, here: NotImplementedError (carriers() is optional for a
    plug-in) means none, as in the grid's detection (``wmbench.detection``); a machine fault is
    raised; any other exception makes the key malformed (its positions cannot be checked, so no
    verdict is given), where the grid's detection warns and goes on without carriers: a run must
    not stop on one method's bug, a verdict on a key must not rest on an unchecked one."""
    def bad(why: str) -> WmbenchError:
        return WmbenchError(f"{key_path}: malformed key for method {method.name} ({why})")

    broken = [name for name, t in key.tensors.items()
              if t.is_floating_point() and not (torch.isfinite(t) | (t.isnan() if name in NAN_MEANS_NONE else False)).all()]
    if broken:
        raise bad(f"non-finite values in {broken[0]!r}")  # a NaN mark reads "not detected", not "damaged"
    names = key.meta.get("params")
    if "param_id" in key.tensors:
        pid, flat = key.tensors["param_id"], key.tensors.get("flat_idx", key.tensors["param_id"])
        if (not isinstance(names, list) or pid.dtype.is_floating_point or pid.dtype == torch.bool
                or pid.dim() != 1 or flat.dim() != 1 or len(pid) != len(flat)):  # 0-d: len() raises TypeError
            raise bad("param_id does not match flat_idx or params")
        if len(pid) and (int(pid.min()) < 0 or int(pid.max()) >= len(names)):
            raise bad(f"param_id outside [0, {len(names)})")
    shapes = key.meta.get("shapes")
    if shapes is not None and not (isinstance(shapes, list) and isinstance(names, list) and len(shapes) == len(names)):
        # zipped with params, a short list left the last tensors' carriers unread: uninitialised memory, a random verdict
        raise bad("shapes does not list one shape per tensor of params")
    try:
        carriers = method.carriers(key)
    except NotImplementedError:
        carriers = {}  # a plug-in without carriers: nothing to check positions against
    except Exception as exc:  # noqa: BLE001 - a damaged key or the method's own bug: one line either way
        if machine_fault(exc):
            raise
        raise bad(f"carriers() raised {type(exc).__name__}: {exc}") from None
    if (carriers and not any(len(idx) for idx in carriers.values())) or (key.tensors and not any(t.numel() for t in key.tensors.values())):
        raise bad("it holds no carrier")  # detection would read p = 1 from nothing
    state = model.state_dict()
    # every tensor the key lists, not only those its carriers happen to fall in (a random draw)
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or name not in state:
            raise bad(f"it names a tensor {name!r} the model lacks")
    problem = carriers_problem(carriers, state)
    if problem:
        raise bad(problem)
    return carriers


MAX_EXAMPLE_VALUES = 2**24  # C x H x W of the example batch resync traces with (a 2048 x 2048 RGB image is 12.6M)


def _example_input(data: dict[str, Any], key_path: Path) -> torch.Tensor:
    """Two zero images of the shape the key's data record names, bounded: a key is untrusted input,
    and its ``image_size`` must not make detection allocate without limit. The record is checked
    by ``key_record.data_record_problem``, as the architecture's build checks it."""
    problem = data_record_problem(data)
    if problem:
        raise WmbenchError(f"{key_path}: malformed data record in the key ({problem})")
    dims = [data["in_channels"], *data["image_size"]]
    if math.prod(dims) > MAX_EXAMPLE_VALUES:
        raise WmbenchError(f"{key_path}: malformed key (input shape {dims[0]} x {dims[1:]}: at most {MAX_EXAMPLE_VALUES} values per image)")
    return torch.zeros(2, *dims)


def _record(key: Key, key_path: Path, field: str) -> dict[str, Any]:
    record = key.meta.get(field)
    if not isinstance(record, dict) or not isinstance(record.get("name", "?"), str):
        raise WmbenchError(f"{key_path}: the key does not record its {field} (written by an older wmbench? re-run wmbench embed)")
    return record


def _plugin_hint(lookup: Any) -> Any:
    """``lookup()``; an unknown name (a plug-in's component) says how to load it."""
    try:
        return lookup()
    except ConfigError as exc:
        if not exc.message.startswith("unknown"):
            raise
        raise ConfigError(exc.field, f"{exc.message}; if a plug-in defines it, pass --plugin FILE.py (or MODULE)") from None


def _method(key: Key, key_path: Path, align: bool | None) -> Method:
    record = _record(key, key_path, "method")
    for field in ("args", "detect"):  # a hand-edited key: a list or text there is no traceback
        if not isinstance(record.get(field) or {}, dict):
            raise WmbenchError(f"{key_path}: malformed key (its method record's {field} is {type(record[field]).__name__}, not a mapping)")
    args = {**(record.get("args") or {}), **(record.get("detect") or {})}
    cls = _plugin_hint(lambda: METHODS.get(str(record.get("name")), "key.method"))
    if align is not None:
        if "align" not in {f.name for f in dataclasses.fields(cls)}:
            raise WmbenchError(f"--align: method {cls.name} has no aligned detection")
        args["align"] = align
    method = METHODS.build(cls.name, args, "key.method")
    if str(method.version) != str(record.get("version", method.version)):  # an instance's: it may depend on its args
        log.warning("the key was written by %s version %s, this is version %s", cls.name, record.get("version"), method.version)
    return method


def _model(key: Key, key_path: Path, path: Path, resized: bool = False, suspect: bool = False) -> nn.Module:
    """The key's architecture, first built on the meta device (nothing allocated) and compared with
    the tensor shapes of the model file ``path``: a key declaring a huge architecture never allocates it. With
    ``resized`` (resync), sizes may differ, but the key's architecture may not be larger than the
    suspect file (dummy units only grow a model). ``suspect``: the shapes are the suspect's, whose
    grown layers the error may point to ``--resync``."""
    with torch.device("meta"):
        skeleton = _build(key, key_path)
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    shapes = suspect_shapes(path, set(expected))  # its names read against the architecture's
    check_shapes(expected, shapes, resized, grown_hint=suspect)
    if resized and sum(math.prod(s) for s in expected.values()) > sum(math.prod(s) for s in shapes.values()):
        raise WmbenchError(f"{key_path}: the key's architecture is larger than the suspect model")
    return _build(key, key_path)


def _build(key: Key, key_path: Path) -> nn.Module:
    record, data = _record(key, key_path, "model"), _record(key, key_path, "data")
    _plugin_hint(lambda: MODELS.get(str(record.get("name")), "key.model"))
    component = MODELS.build(str(record.get("name")), record.get("args") or {}, "key.model")
    problem = data_record_problem(data)
    if problem:
        raise WmbenchError(f"{key_path}: malformed data record in the key ({problem})")
    try:
        channels, (height, width), classes = data["in_channels"], data["image_size"], data["num_classes"]
        images = torch.zeros(0, channels, height, width)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise WmbenchError(f"{key_path}: malformed data record in the key ({exc})") from None
    labels = torch.zeros(0, dtype=torch.int64)
    shape_only = DataBundle(str(data.get("name", "?")), images, labels, images, labels, classes, task=str(data.get("task", "classification")))
    try:
        return component.build(shape_only)
    except Exception as exc:  # a record no architecture can be built from
        raise WmbenchError(f"{key_path}: cannot build {component.name} from the key's record ({type(exc).__name__}: {exc})") from None
