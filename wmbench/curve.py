"""The accuracy-time curve of a scenario's training recipe: each model trained unwatermarked, one
training per seed, its test metric measured after every epoch (``wmbench curve``).

A point at epoch k is the model after k epochs of the scenario's schedule of ``training.epochs``:
with a decaying schedule it is a lower bound for what a k-epoch schedule reaches (the last point is
the scenario's own operating point). Training minutes exclude the evaluations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from wmbench.api import plain_step
from wmbench.blame import incompatible
from wmbench.devices import device_label, resolve_device
from wmbench.errors import ConfigError
from wmbench.metrics import task_metric
from wmbench.names import inside, md_cell
from wmbench.scenario import Scenario
from wmbench.seeding import seeded
from wmbench.statistics import mean_interval
from wmbench.train import Trainer
from wmbench.worker import check_runs

log = logging.getLogger(__name__)

COLUMNS = ["scenario", "model", "dataset", "seed", "epoch", "epochs", "train_minutes", "metric", "metric_value", "torch_threads", "device"]


def accuracy_time_curve(scenario: Scenario, cache_dir: Path, device: str, progress: bool = True) -> pd.DataFrame:
    """One row per (dataset, model, seed, epoch): minutes of training so far and the test metric."""
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    for dataset in scenario.datasets:
        data = dataset.obj.load(cache_dir)
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
                trainer = Trainer(data, scenario.training, dev, torch.Generator().manual_seed(seed), desc, progress)

                def measure(net: torch.nn.Module, epoch: int, model_label: str = model_spec.label, seed: int = seed, trainer: Trainer = trainer, desc: str = desc) -> None:
                    metric, value = task_metric(net, data, dev)
                    rows.append({
                        "scenario": scenario.name, "model": model_label, "dataset": dataset.label, "seed": seed,
                        "epoch": epoch, "epochs": scenario.training.epochs, "train_minutes": sum(trainer.epoch_seconds) / 60,
                        "metric": metric, "metric_value": value, "torch_threads": torch.get_num_threads(), "device": device_label(dev),
                    })
                    if progress:  # a curve runs for many minutes: say each point as it comes
                        tqdm.write(f"{desc} epoch {epoch}: {metric} {100 * value:.2f}% after {rows[-1]['train_minutes']:.2f} training minutes")

                trainer.on_epoch = measure
                with seeded(seed, dev):
                    trainer.fit(model, plain_step)
    return pd.DataFrame(rows, columns=COLUMNS)


def curve_markdown(frame: pd.DataFrame) -> str:
    """Per model and epoch: mean training minutes and the metric's mean with a 95% t interval over seeds."""
    table = []
    for (model, dataset, epoch), group in frame.groupby(["model", "dataset", "epoch"], sort=True):
        value = mean_interval(100 * group["metric_value"])
        table.append([md_cell(model), md_cell(dataset), epoch, f"{group['train_minutes'].mean():.2f}", value.text(), len(group)])
    metric = frame["metric"].iloc[0] if len(frame) else "metric"
    headers = ["model", "dataset", "epoch", "train minutes (mean)", f"{metric} % (mean [95% CI])", "seeds"]
    return tabulate(table, headers=headers, tablefmt="github")


def write_curve(frame: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """``<out>/<name>_curve.csv`` and ``<out>/<name>_curve.md``."""
    out.mkdir(parents=True, exist_ok=True)
    csv, md = inside(out, f"{name}_curve.csv"), inside(out, f"{name}_curve.md")
    frame.to_csv(csv, index=False, float_format="%.6g")
    md.write_text(f"# {md_cell(name)}: accuracy-time curve\n\n{curve_markdown(frame)}\n", encoding="utf-8")
    return [csv, md]
