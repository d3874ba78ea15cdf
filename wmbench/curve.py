"""The accuracy-time curve of a scenario's training recipe: each model trained unwatermarked, one
training per seed, its test metric measured after every epoch (``wmbench curve``).

A point at epoch k is the model after k epochs of the scenario's schedule of ``training.epochs``:
with a decaying schedule it is a lower bound for what a k-epoch schedule reaches (the last point is
the scenario's own operating point). Training minutes exclude the evaluations. For classification
each point also gives the accuracy with horizontal-flip test-time augmentation (``metric_value_flip``:
the mean of the logits of each image and its mirror, as airbench reports); grid rows use the plain
metric. With ``holdout`` the points are measured on that many training images held out of the
training (``data.hold_out``) instead of the test set, so that a recipe can be chosen without it.

A curve runs for hours at a real operating point, so each seed's points are kept in the cache as
soon as its training ends (``curves/<id>.json``, the id from everything they depend on: the
training block, model, dataset and its decoded digest, seed, hold-out, device, threads and wmbench
version); a curve run again, or after a crash, reuses the seeds it has and trains only the others.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

import wmbench
from wmbench.api import plain_step
from wmbench.blame import incompatible
from wmbench.cache import canonical_hash
from wmbench.data import DataBundle, hold_out, load_seeded
from wmbench.devices import device_label, resolve_device
from wmbench.errors import ConfigError
from wmbench.grid import identity, training_identity
from wmbench.machine_speed import process_machine_speed
from wmbench.metrics import TASK_METRICS, accuracies_with_tta, task_metric
from wmbench.models import Model
from wmbench.names import check_entries, inside, md_cell
from wmbench.safe_io import read_bytes, write_atomic
from wmbench.scenario import Component, Scenario
from wmbench.seeding import seeded
from wmbench.statistics import DURATION_RANGE, PERCENT_RANGE, mean_interval
from wmbench.summary import seeds_text
from wmbench.train import Trainer
from wmbench.model_checks import check_runs

log = logging.getLogger(__name__)

CURVE_FORMAT = 1
COLUMNS = ["scenario", "model", "dataset", "seed", "epoch", "epochs", "train_minutes", "metric", "metric_value", "metric_value_flip", "metric_value_flip_translate", "evaluated_on", "torch_threads", "device", "reference_images_per_s"]


def seed_curve_id(scenario: Scenario, model: Component[Model], dataset: Component[Any], data: DataBundle, seed: int, holdout: int, device: torch.device, every: int = 1) -> str:
    """The id of one seed's points: a hash of everything they depend on."""
    return canonical_hash({
        "format": CURVE_FORMAT, "wmbench_version": wmbench.__version__, "model": identity(model.obj),
        "dataset": identity(dataset.obj), "data_digest": data.digest, "training": training_identity(scenario.training),
        "seed": seed, "holdout": holdout, "device": device_label(device), "torch_threads": torch.get_num_threads(),
        **({"every": every} if every != 1 else {}),  # every epoch: the ids of the curves kept before --every
    })


TEXT_COLUMNS = frozenset({"scenario", "model", "dataset", "metric", "evaluated_on", "device"})


def _is_point(row: Any, seed: int) -> bool:
    """A stored curve point of ``seed``: every column, text where text belongs, numbers elsewhere."""
    if not (isinstance(row, dict) and set(COLUMNS) <= row.keys() and row["seed"] == seed):
        return False
    for column in COLUMNS:
        value = row[column]
        if column in TEXT_COLUMNS:
            if not isinstance(value, str):
                return False
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return False
    return True


def cached_seed_rows(path: Path, seed: int, labels: dict[str, str]) -> list[dict[str, Any]] | None:
    """A seed's stored points relabelled with ``labels``; None when absent or unreadable (then
    the seed is trained again)."""
    if not path.exists():
        return None
    try:
        rows = json.loads(read_bytes(path))
        if not isinstance(rows, list) or not rows or not all(_is_point(r, seed) for r in rows):
            raise ValueError("not a list of this seed's curve points")
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("curve: ignoring the unreadable cached points %s (%s); training that seed again", path, exc)
        return None
    return [{**{c: r[c] for c in COLUMNS}, **labels} for r in rows]


def accuracy_time_curve(scenario: Scenario, cache_dir: Path, device: str, progress: bool = True, holdout: int = 0, every: int = 1) -> pd.DataFrame:
    """One row per (dataset, model, seed, measured epoch): minutes of training so far and the test
    metric (or, with ``holdout``, the metric on that many held-out training images). ``every``:
    measure every that many epochs and at the last (evaluation time does not count as training
    time, but a long schedule's evaluations add wall time)."""
    if every < 1:
        raise ConfigError("--every", f"expected a number of epochs >= 1, got {every}")
    if scenario.training.epochs < 1:
        raise ConfigError("training.epochs", "a curve measures epochs: expected at least 1, got 0")
    dev = resolve_device(device)
    evaluated_on = f"holdout {holdout} of train" if holdout else "test"
    speed = process_machine_speed(dev)  # so that this curve's minutes compare with another machine's
    if progress and speed is not None:
        tqdm.write(f"curve: this machine trains the reference step at {speed:.0f} images/s ({torch.get_num_threads()} threads, {device_label(dev)})")
    rows: list[dict[str, Any]] = []
    for dataset in scenario.datasets:
        data = load_seeded(dataset.obj, cache_dir)  # the same data as the grid's workers load
        if holdout:
            try:
                data = hold_out(data, holdout)
            except ValueError as exc:
                raise ConfigError("datasets", f"{dataset.label}: {exc}") from exc
        for model_spec in (m for m in scenario.models if m.pairs_with(dataset.label)):
            for seed in scenario.seeds:
                try:
                    with seeded(seed, torch.device("cpu")):
                        model = model_spec.obj.build(data)
                        check_runs(model, data)
                except ConfigError as exc:
                    error = incompatible(exc, scenario, "models", model_spec)
                    log.warning("curve: %s/%s skipped: %s", model_spec.label, dataset.label, error)
                    break
                desc = f"curve {model_spec.label}/{dataset.label}/seed{seed}"
                stored = Path(cache_dir) / "curves" / f"{seed_curve_id(scenario, model_spec, dataset, data, seed, holdout, dev, every)}.json"
                reused = cached_seed_rows(stored, seed, {"scenario": scenario.name, "model": model_spec.label, "dataset": dataset.label})
                if reused is not None:
                    rows.extend(reused)
                    if progress:
                        tqdm.write(f"{desc}: {len(reused)} points reused from the cache ({stored})")
                    continue
                first = len(rows)
                trainer = Trainer(data, scenario.training, dev, torch.Generator().manual_seed(seed), desc, progress)

                def measure(net: torch.nn.Module, epoch: int, model_label: str = model_spec.label, seed: int = seed, trainer: Trainer = trainer, desc: str = desc) -> None:
                    last = epoch == scenario.training.epochs
                    if epoch % every and not last:
                        return
                    if data.task == "classification":  # all from one pass over the test images; multi-crop (6 passes) at the end only
                        metric = TASK_METRICS["classification"][0]
                        value, flipped, translated = accuracies_with_tta(net, data, dev, "flip_translate" if last else "flip")
                    else:
                        (metric, value), flipped, translated = task_metric(net, data, dev), float("nan"), float("nan")
                    rows.append({
                        "scenario": scenario.name, "model": model_label, "dataset": dataset.label, "seed": seed,
                        "epoch": epoch, "epochs": scenario.training.epochs, "train_minutes": sum(trainer.epoch_seconds) / 60,
                        "metric": metric, "metric_value": value, "metric_value_flip": flipped, "metric_value_flip_translate": translated, "evaluated_on": evaluated_on, "torch_threads": torch.get_num_threads(), "device": device_label(dev), "reference_images_per_s": speed,
                    })
                    if progress:  # a curve runs for many minutes: say each point as it comes
                        with_flip = "" if math.isnan(flipped) else f" ({100 * flipped:.2f}% with flip TTA"
                        with_flip += "" if math.isnan(translated) else f", {100 * translated:.2f}% with flip and translate TTA"
                        with_flip += ")" if with_flip else ""
                        tqdm.write(f"{desc} epoch {epoch}: {metric} {100 * value:.2f}%{with_flip} after {rows[-1]['train_minutes']:.2f} training minutes")

                trainer.on_epoch = measure
                with seeded(seed, dev):
                    trainer.fit(model, plain_step)
                try:
                    write_atomic(stored, json.dumps(rows[first:]).encode())
                except OSError as exc:  # a read-only cache costs the reuse, not the curve
                    log.warning("curve: cannot keep %s's points in the cache (%s)", desc, exc.strerror or exc)
    return pd.DataFrame(rows, columns=COLUMNS)


TTA_COLUMNS = {"metric_value_flip": "with flip TTA", "metric_value_flip_translate": "with flip and translate TTA (last epoch)"}


def curve_markdown(frame: pd.DataFrame) -> str:
    """Per model and epoch: the training minutes and the metric, each a mean with its 95% t interval
    over seeds (and the same for each test-time-augmented accuracy the curve has). One table per
    metric (a classification and a segmentation dataset: an ``accuracy`` and a ``miou`` table, each
    headed by its own metric), in the order the curve measured them."""
    labels = frame["metric"].fillna("metric").astype(str)
    metrics = list(dict.fromkeys(labels)) if len(frame) else ["metric"]
    if len(metrics) == 1:
        return _metric_table(frame, metrics[0])
    return "\n\n".join(_metric_table(frame[labels == m], m) for m in metrics)


def _metric_table(frame: pd.DataFrame, metric: str) -> str:
    """``curve_markdown``'s table of the rows of one ``metric``."""
    tta = [c for c in TTA_COLUMNS if c in frame and bool(frame[c].notna().any())]
    of = frame.groupby(["model", "dataset"])["seed"].nunique()  # the seeds each curve was run with
    table = []
    for (model, dataset, epoch), group in frame.groupby(["model", "dataset", "epoch"], sort=True):
        row = [md_cell(model), md_cell(dataset), epoch, mean_interval(group["train_minutes"], bounds=DURATION_RANGE).text(),
               mean_interval(100 * group["metric_value"], bounds=PERCENT_RANGE).text()]
        row += [mean_interval(100 * group[c], bounds=PERCENT_RANGE).text() if group[c].notna().all() else "" for c in tta]
        table.append([*row, seeds_text(len(group), 0, int(of[(model, dataset)]))])
    headers = ["model", "dataset", "epoch", "train minutes (mean [95% CI])", f"{md_cell(metric)} % (mean [95% CI])", *(f"{TTA_COLUMNS[c]} % (mean [95% CI])" for c in tta), "seeds"]
    align = ["left", "left", "right"] + ["left"] * (len(headers) - 3)
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True, colalign=align)  # "87.00" stays as printed


def write_curve(frame: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """``<out>/<name>_curve.csv`` and ``<out>/<name>_curve.md``."""
    check_entries(out, (f"{name}_curve.csv", f"{name}_curve.md"))
    out.mkdir(parents=True, exist_ok=True)
    csv, md = inside(out, f"{name}_curve.csv"), inside(out, f"{name}_curve.md")
    frame.to_csv(csv, index=False, float_format="%.6g")
    speed = ""
    if "reference_images_per_s" in frame and frame["reference_images_per_s"].notna().any():
        speed = f"Reference throughput of the machine (wmbench.machine_speed): {frame['reference_images_per_s'].mean():.0f} training images/s.\n\n"
    md.write_text(f"# {md_cell(name)}: accuracy-time curve\n\n{speed}{curve_markdown(frame)}\n", encoding="utf-8")
    return [csv, md]
