"""Leaderboard plots: error and detection statistic against attack strength, one panel per attack."""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg  # explicit Agg: no display, no pyplot state
from matplotlib.figure import Figure

from wmbench.names import safe_filename

QUANTITIES = {"error": "error (%)", "detect_stat": "detection statistic"}
MAX_COLUMNS = 4
_COLORS = [f"C{i}" for i in range(10)]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def plot_leaderboard(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per (model, dataset): ``<model>-<dataset>-error.png`` and ``...-detect_stat.png``; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = sorted(frame["method"].dropna().unique())
    paths: list[Path] = []
    for (model, dataset), group in frame.groupby(["model", "dataset"], sort=True):
        for quantity, label in QUANTITIES.items():
            path = out_dir / f"{_slug(model)}-{_slug(dataset)}-{quantity}.png"
            figure = _figure(group, quantity, label, f"{model} / {dataset}", methods)
            _save(figure, path)
            paths.append(path)
    return paths


def _figure(group: pd.DataFrame, quantity: str, label: str, title: str, methods: list[str]) -> Figure:
    attacks = sorted(group["attack"].dropna().unique())
    ncols = min(len(attacks), MAX_COLUMNS) or 1
    nrows = max(math.ceil(len(attacks) / ncols), 1)
    figure = Figure(figsize=(max(3.6 * ncols, 6.0), 2.9 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for axis, attack in zip(axes, attacks):
        _panel(axis, group[group["attack"] == attack], quantity, methods)
        axis.set_title(f"{title} · {attack}", fontsize=9)
        axis.set_xlabel("strength")
        axis.set_ylabel(label)
    for axis in axes[len(attacks):]:
        axis.set_visible(False)
    figure.suptitle(f"{title}: {label} vs attack strength")
    handles, labels = _legend_entries(axes, methods)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), frameon=False)
    return figure


def _panel(axis, rows: pd.DataFrame, quantity: str, methods: list[str]) -> None:
    """One line per method: mean over seeds with markers, min/max over seeds as a band."""
    plotted = False
    for index, method in enumerate(methods):
        per_seed = rows[rows["method"] == method].groupby(["strength", "seed"])[quantity].mean().dropna()
        if per_seed.empty:
            continue
        stats = per_seed.groupby(level="strength").agg(["mean", "min", "max"]).sort_index()
        x = stats.index.to_numpy(dtype=float)
        color, marker = _COLORS[index % len(_COLORS)], _MARKERS[index % len(_MARKERS)]
        axis.plot(x, stats["mean"], color=color, marker=marker, markersize=4, label=method)
        if len(x) > 1 and (stats["max"] > stats["min"]).any():
            axis.fill_between(x, stats["min"], stats["max"], color=color, alpha=0.15, linewidth=0)
        plotted = True
    if not plotted:
        axis.text(0.5, 0.5, "n/a", transform=axis.transAxes, ha="center", va="center", color="grey")
    axis.grid(True, alpha=0.3)


def _legend_entries(axes, methods: list[str]) -> tuple[list, list[str]]:
    """One entry per method plotted in any panel, in method order."""
    entries: dict[str, object] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = [m for m in methods if m in entries]
    return [entries[m] for m in labels], labels


def _slug(value: object) -> str:
    return safe_filename(re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value)), max_bytes=80, default="_")


def _save(figure: Figure, path: Path) -> None:
    """Render to a temporary file and rename it into place; no Software/date metadata."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            figure.savefig(fh, format="png", dpi=110, metadata={"Software": None})
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
