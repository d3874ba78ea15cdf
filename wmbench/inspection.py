"""``wmbench inspect MODEL``: a model's parameter names, shapes and counts, and its dead weights.

Plug-in authors need parameter names (a method that marks one layer names it); everyone needs to
know how much of a model can matter at a dataset's input size (``wmbench.liveness``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wmbench.cache import default_cache_dir
from wmbench.data import DataBundle, load_seeded
from wmbench.errors import WmbenchError
from wmbench.liveness import live_map
from wmbench.models import weight_params
from wmbench.registry import DATASETS, MODELS, build_dataclass

# (channels, height, width, classes, task) of datasets whose loading needs files or a download;
# the others (digits, synthetic...) are loaded, which is quick and offline.
KNOWN_SHAPES: dict[str, tuple[int, int, int, int, str]] = {
    "cifar10": (3, 32, 32, 10, "classification"),
    "cityscapes": (3, 256, 512, 19, "segmentation"),
}


def shape_bundle(dataset: str, args: dict[str, Any] | None = None, cache_dir: Path | None = None) -> DataBundle:
    """A DataBundle with the shape of ``dataset`` (2 zero images when its real data needs files)."""
    args = dict(args or {})
    DATASETS.get(dataset, "--dataset")
    if dataset in KNOWN_SHAPES:
        c, h, w, classes, task = KNOWN_SHAPES[dataset]
        if dataset == "cityscapes" and "size" in args:
            h, w = (int(v) for v in args["size"])
        x = torch.zeros(2, c, h, w)
        y = torch.zeros(2, h, w, dtype=torch.long) if task == "segmentation" else torch.zeros(2, dtype=torch.long)
        return DataBundle(dataset, x, y, x, y, classes, task=task)
    return load_seeded(DATASETS.build(dataset, args, "--dataset"), cache_dir or default_cache_dir())


def describe(model_name: str, model_args: dict[str, Any] | None = None, dataset: str = "cifar10", dataset_args: dict[str, Any] | None = None,
             cache_dir: Path | None = None) -> str:
    """The ``wmbench inspect`` report: one line per parameter (name, shape, count, dead share),
    then totals; "dead" = cannot change the output at this input size (a zero gradient always).
    A dataset that is loaded is read from ``cache_dir`` (default: ``$WMBENCH_CACHE``, as ``run``'s)."""
    data = shape_bundle(dataset, dataset_args, cache_dir)
    model = build_dataclass(MODELS.get(model_name, "model"), dict(model_args or {}), "--arg").build(data)
    shape = tuple(data.train_x.shape[1:])
    live = live_map(model, shape)
    if live.failure:
        described = f"{model_name} {model_args}" if model_args else model_name
        raise WmbenchError(f"{described} does not run on {dataset} inputs of shape {'x'.join(map(str, shape))} ({live.failure})")
    rows = []
    for name, p in model.named_parameters():
        dead = live.numel(name) - live.live_count(name)
        rows.append((name, "x".join(map(str, p.shape)) or "scalar", f"{p.numel():,}", f"{100 * dead / max(1, p.numel()):.1f}%"))
    widths = [max(len(r[i]) for r in rows + [("parameter", "shape", "count", "dead")]) for i in range(4)]
    fmt = f"{{:<{widths[0]}}}  {{:<{widths[1]}}}  {{:>{widths[2]}}}  {{:>{widths[3]}}}"
    c, h, w = shape[0], shape[1], shape[2] if len(shape) > 2 else 1
    lines = [f"{model_name} on {dataset}: input {c}x{h}x{w}, {data.num_classes} classes ({data.task})", ""]
    lines.append(fmt.format("parameter", "shape", "count", "dead"))
    lines += [fmt.format(*r) for r in rows]
    weights = list(weight_params(model))
    n_weights = sum(live.numel(n) for n in weights)
    n_all = sum(live.numel(n) for n in live.shapes)
    lines += [
        "",
        f"parameters:          {n_all:,} in {len(live.shapes)} tensors; dead {100 * live.dead_fraction():.1f}%",
        f"Conv/Linear weights: {n_weights:,} in {len(weights)} tensors; dead {100 * live.dead_fraction(weights):.1f}%"
        " (image marks draw carriers among the live ones)",
    ]
    return "\n".join(lines)
