"""Leaderboard plots: task error and detection against attack strength, one column per attack.

``<model>-<dataset>-error.png``: error (%) per attack (``plot_stems``: a hash of the labels added
where they clash). ``...-detect_stat.png``: one row per detection statistic (Pearson r, bit
accuracy, z score: each with its chance level) and a row of -log10 p with the detection threshold.
Strengths spanning a decade or more (noise, key_leak counts) are on a log axis; the unattacked
model is drawn at its own ``clean`` tick left of the tested strengths. Text is drawn as written:
matplotlib's mathtext is off (``LITERAL_TEXT``), so a label such as ``$x^2$`` or ``$\\alpha_$``
(labels come from scenarios and results files) shows its characters, not a formula or a parse error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg  # explicit Agg: no display, no pyplot state
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from wmbench.statistic_kinds import STATISTICS
from wmbench.names import safe_filename
from wmbench.summary import GroupSummary, detection_threshold, log10_p, statistics_of

MAX_COLUMNS = 5
LOG_RATIO = 10.0  # strengths whose largest / smallest reaches this are drawn on a log axis
_COLORS = [f"C{i}" for i in range(10)]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_STYLES = ["-", "--", "-.", ":"]
_BAND = "band: min to max over seeds"
# Every figure is built and saved under this: text objects read ``text.parse_math`` when created,
# tick labels are created when the figure is drawn (saved).
LITERAL_TEXT = matplotlib.rc_context({"text.parse_math": False})


_QUANTITIES = ["error", "detect_stat", "neg_log10_p"]


PLOT_QUANTITIES = ("error", "detect_stat")
PLOT_SUFFIXES = tuple(f"-{q}.png" for q in PLOT_QUANTITIES)  # how every plot file name ends


@LITERAL_TEXT
def plot_leaderboard(
    frame: pd.DataFrame, out_dir: Path, groups: list[GroupSummary] | None = None,
) -> dict[tuple[object, object], list[Path]]:
    """Per (model, dataset): ``<stem>-error.png`` and ``<stem>-detect_stat.png`` (``plot_stems``),
    their paths keyed by the exact (model, dataset) they show (``groups``, from ``summarize_frame``,
    only say which statistic each method reports)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = frame.assign(neg_log10_p=-log10_p(frame))
    methods = sorted(frame["method"].dropna().unique())
    threshold = detection_threshold(frame)
    kinds = {s.method: s.statistic for g in groups for s in g.methods} if groups is not None else statistics_of(frame)
    pairs = list(frame.groupby(["model", "dataset"], sort=True))
    stems = plot_stems([key for key, _ in pairs])
    out: dict[tuple[object, object], list[Path]] = {}
    for (model, dataset), group in pairs:
        title = f"{model} / {dataset}"
        points = seed_points(group)
        for quantity, figure in (
            (PLOT_QUANTITIES[0], error_figure(group, title, methods, points)),
            (PLOT_QUANTITIES[1], detection_figure(group, title, methods, threshold, points, kinds)),
        ):
            path = out_dir / f"{stems[(model, dataset)]}-{quantity}.png"
            _save(figure, path)
            out.setdefault((model, dataset), []).append(path)
    return out


def plot_stems(keys: Iterable[tuple[object, object]]) -> dict[tuple[object, object], str]:
    """Per (model, dataset): the stem of its plot files, ``<model>-<dataset>`` slugged, plus a short
    hash of the exact labels where the slug changes a label or two stems clash (ignoring case, as
    macOS and Windows do): every group's files are its own, and plain labels keep plain names."""
    keys = list(dict.fromkeys(keys))
    plain = {k: f"{_slug(k[0])}-{_slug(k[1])}" for k in keys}
    hashed = {k for k in keys if _slug(k[0]) != str(k[0]) or _slug(k[1]) != str(k[1])}
    while True:
        stems = {k: f"{plain[k]}-{_label_hash(k)}" if k in hashed else plain[k] for k in keys}
        counts = Counter(stem.casefold() for stem in stems.values())
        clashing = {k for k in keys if counts[stems[k].casefold()] > 1} - hashed
        if not clashing:  # (two hashed stems clash only if their 48-bit hashes do)
            return stems
        hashed |= clashing


def _label_hash(key: tuple[object, object]) -> str:
    return hashlib.sha256(json.dumps([str(v) for v in key]).encode("utf-8")).hexdigest()[:12]


Points = dict[tuple[str, "str | None"], tuple[np.ndarray, dict[str, np.ndarray]]]


def seed_points(group: pd.DataFrame) -> Points:
    """Per (method, attack): the tested strengths, and per quantity (error, detect_stat, -log10 p)
    an array of rows (mean, min, max) over seeds at each (a seed's rows averaged first; infinities as
    missing, rows without a seed left out); per (method, None) the same for the clean rows (strength
    0 of every attack pooled), one row (strength NaN)."""
    frame = group.assign(neg_log10_p=group["neg_log10_p"] if "neg_log10_p" in group else -log10_p(group))
    frame = frame[["method", "attack", "strength", "seed", *_QUANTITIES]].replace([np.inf, -np.inf], np.nan)
    frame = frame.dropna(subset=["method", "strength", "seed"])
    out: Points = {}
    clean = frame[frame["strength"] == 0].groupby(["method", "seed"], sort=True)[_QUANTITIES].mean()
    clean = clean.groupby(level=0, sort=True)[_QUANTITIES].agg(["mean", "min", "max"])
    for method, row in zip(clean.index, _arrays(clean)):
        out[(method, None)] = (np.array([math.nan]), {q: values[None, :] for q, values in row.items()})
    attacked = frame[frame["strength"] != 0].dropna(subset=["attack"])
    means = attacked.groupby(["method", "attack", "strength", "seed"], sort=True)[_QUANTITIES].mean()
    stats = means.groupby(level=[0, 1, 2], sort=True)[_QUANTITIES].agg(["mean", "min", "max"])
    keys = list(zip(stats.index.get_level_values(0), stats.index.get_level_values(1)))
    strengths = stats.index.get_level_values(2).to_numpy(dtype=float)
    arrays = {q: stats[q][["mean", "min", "max"]].to_numpy(dtype=float) for q in _QUANTITIES}
    starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]  # rows sorted by key
    for start, end in zip(starts, [*starts[1:], len(keys)]):
        out[keys[start]] = (strengths[start:end], {q: a[start:end] for q, a in arrays.items()})
    return out


def _arrays(stats: pd.DataFrame) -> list[dict[str, np.ndarray]]:
    """Per row of a (quantity, mean/min/max) frame: quantity -> array (mean, min, max)."""
    arrays = {q: stats[q][["mean", "min", "max"]].to_numpy(dtype=float) for q in _QUANTITIES}
    return [{q: a[i] for q, a in arrays.items()} for i in range(len(stats))]


@LITERAL_TEXT
def error_figure(group: pd.DataFrame, title: str, methods: list[str], points: Points | None = None) -> Figure:
    points = seed_points(group) if points is None else points
    attacks = _attacks(group)
    ncols = min(len(attacks), MAX_COLUMNS) or 1
    nrows = max(math.ceil(len(attacks) / ncols), 1)
    figure, axes = _grid(nrows, ncols)
    for axis, attack in zip(axes.ravel(), attacks):
        _panel(axis, group, attack, "error", methods, points)
        axis.set_title(f"{attack}", fontsize=9)
        axis.set_ylabel("error (%)")
    for axis in axes.ravel()[len(attacks):]:
        axis.set_visible(False)
    figure.suptitle(f"{title}: task error vs attack strength")
    _legend(figure, axes, methods, [])
    return figure


@LITERAL_TEXT
def detection_figure(
    group: pd.DataFrame, title: str, methods: list[str], threshold: float | None,
    points: Points | None = None, statistics: dict[str, str] | None = None,
) -> Figure:
    """Rows: each statistic in use (its methods only, chance level dashed), then -log10 p (all
    methods); ``statistics``: method -> statistic (``statistics_of(group)`` when not given)."""
    points = seed_points(group) if points is None else points
    statistics = statistics_of(group) if statistics is None else statistics
    attacks = _attacks(group)
    kinds: dict[str, list[str]] = {}
    with_stat = set(group.loc[group["detect_stat"].notna(), "method"].dropna())
    for method in methods:
        if method in with_stat:
            kinds.setdefault(statistics.get(method, ""), []).append(method)
    rows = [(kind, members) for kind, members in sorted(kinds.items(), key=lambda kv: (kv[0] == "", kv[0]))]
    has_p = bool(group["neg_log10_p"].replace([np.inf, -np.inf], np.nan).notna().any())
    per_block = len(rows) + has_p or 1
    ncols = min(len(attacks), MAX_COLUMNS) or 1
    blocks = max(math.ceil(len(attacks) / ncols), 1)
    figure, axes = _grid(per_block * blocks, ncols)
    extras: list = []
    for index, attack in enumerate(attacks):
        top, column = per_block * (index // ncols), index % ncols
        for row, (kind, members) in enumerate(rows):
            axis = axes[top + row, column]
            _panel(axis, group, attack, "detect_stat", methods, points, only=members)
            name, null = STATISTICS.get(kind, (kind or "detection statistic", None))  # a newer version's name as written
            if null is not None:
                axis.axhline(null, color="0.35", linestyle=(0, (4, 3)), linewidth=1.0, label="chance (no watermark)")
            axis.set_ylabel(name)
        if has_p:
            axis = axes[top + len(rows), column]
            _panel(axis, group, attack, "neg_log10_p", methods, points)
            axis.set_yscale("symlog", linthresh=1.0)
            if threshold is not None:
                axis.axhline(-math.log10(threshold), color="black", linestyle="-", linewidth=0.9,
                             label=f"detection threshold (p = {threshold:g})")
            axis.set_ylabel("-log10 p")
        axes[top, column].set_title(attack, fontsize=9)
    for index in range(len(attacks), ncols * blocks):
        for row in range(per_block):
            axes[per_block * (index // ncols) + row, index % ncols].set_visible(False)
    if not attacks:
        axes[0, 0].text(0.5, 0.5, "n/a", transform=axes[0, 0].transAxes, ha="center", va="center", color="grey")
    figure.suptitle(f"{title}: detection vs attack strength")
    for axis in axes.ravel():
        extras += [h for h, lab in zip(*axis.get_legend_handles_labels()) if lab not in methods]
    _legend(figure, axes, methods, extras)
    return figure


def _panel(
    axis, group: pd.DataFrame, attack: str, quantity: str, methods: list[str], points: Points, only: list[str] | None = None,
) -> None:
    """One line per method: the mean over seeds at ``clean`` and at each strength, min/max over
    seeds as a band (``points``: ``seed_points(group)``)."""
    strengths = np.sort(group.loc[(group["attack"] == attack) & (group["strength"] != 0), "strength"].dropna().unique())
    clean_x, log = _axis(axis, strengths)
    plotted = False
    for index, method in enumerate(methods):
        if only is not None and method not in only:
            continue
        clean, tested = points.get((method, None)), points.get((method, attack))
        parts = [(np.full(1, clean_x), clean[1])] if clean is not None else []
        parts += [tested] if tested is not None else []
        if not parts:
            continue
        x = np.concatenate([at for at, _ in parts])
        values = np.concatenate([figures[quantity] for _, figures in parts])
        keep = ~np.isnan(values[:, 0])  # a strength where no seed has a value is left out
        x, mean, low, high = x[keep], values[keep, 0], values[keep, 1], values[keep, 2]
        if not len(x):
            continue
        color = _COLORS[index % len(_COLORS)]
        hollow = index % 2 == 1
        axis.plot(
            x, mean, color=color, marker=_MARKERS[index % len(_MARKERS)], markersize=6 if hollow else 4,
            markerfacecolor="none" if hollow else color, linestyle=_STYLES[index % len(_STYLES)],
            linewidth=max(2.8 - 0.3 * index, 1.0),  # later lines thinner, so one drawn over another shows both
            label=method,
        )
        if (high > low).any():
            axis.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
        plotted = True
    if not plotted:
        axis.text(0.5, 0.5, "n/a", transform=axis.transAxes, ha="center", va="center", color="grey")
    axis.set_xlabel("strength (log scale)" if log else "strength", fontsize=8)
    axis.grid(True, alpha=0.3)


def _axis(axis, strengths: np.ndarray) -> tuple[float, bool]:
    """Set the x scale and ticks for ``strengths`` (positive, sorted); return where ``clean`` goes
    (one typical step left of the smallest strength, behind a dotted separator) and whether log."""
    positive = strengths[strengths > 0]
    log = len(positive) > 1 and positive.min() > 0 and len(positive) == len(strengths) and positive.max() / positive.min() >= LOG_RATIO
    if log:
        step = (positive.max() / positive.min()) ** (1.0 / (len(positive) - 1))
        clean_x = float(positive.min() / step)
        axis.set_xscale("log")
        separator = math.sqrt(clean_x * positive.min())
    elif len(strengths):
        low, high = float(strengths.min()), float(strengths.max())
        step = (high - low) / (len(strengths) - 1) if len(strengths) > 1 else (abs(low) or 1.0)
        clean_x = low - step
        separator = low - step / 2
    else:
        clean_x, separator = 0.0, None
    ticks = [clean_x, *[float(s) for s in strengths]]
    axis.set_xticks(ticks, ["clean", *[f"{s:g}" for s in strengths]], fontsize=7)
    axis.minorticks_off()
    if separator is not None:
        axis.axvline(separator, color="0.6", linestyle=":", linewidth=0.8)
    return clean_x, log


def _attacks(group: pd.DataFrame) -> list[str]:
    attacked = sorted(group.loc[group["strength"] != 0, "attack"].dropna().unique())
    return attacked or sorted(group["attack"].dropna().unique())[:1]


def _grid(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(max(3.3 * ncols, 6.0), 2.7 * nrows + 1.0), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def _legend(figure: Figure, axes: np.ndarray, methods: list[str], extras: list) -> None:
    """One entry per method plotted in any panel, then the reference lines, then what the band is."""
    entries: dict[str, object] = {}
    for axis in axes.ravel():
        for handle, label in zip(*axis.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = [m for m in methods if m in entries]
    handles = [entries[m] for m in labels]
    seen = set(labels)
    for handle in extras:
        if handle.get_label() not in seen:
            seen.add(handle.get_label())
            handles.append(Line2D([], [], color=handle.get_color(), linestyle=handle.get_linestyle()))
            labels.append(handle.get_label())
    handles.append(Patch(facecolor="0.5", alpha=0.3, linewidth=0))
    labels.append(_BAND)
    if len(labels) > 1:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False, fontsize=8)


def _slug(value: object) -> str:
    return safe_filename(re.sub(r"[^A-Za-z0-9._+-]+", "_", str(value)), max_bytes=80, default="_")


@LITERAL_TEXT
def _save(figure: Figure, path: Path) -> None:
    """Render to a temporary file and rename it into place; no Software/date metadata."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            figure.savefig(fh, format="png", dpi=100, metadata={"Software": None})
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
