"""The leaderboard's figures, as data: per-cell means with intervals over seeds, detection counts,
the cheapest removal per attack. The Markdown, HTML and plots render these; none computes its own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from wmbench.errors import ConfigError
from wmbench.metrics import STATISTICS
from wmbench.registry import METHODS
from wmbench.statistics import Interval, mean_interval, share_text

# A removal that costs less than this many points of task error is "cheap" (the mark is worthless).
CHEAP_REMOVAL_POINTS = 2.0
DEFAULT_THRESHOLD = 1e-6

LEGEND = (
    "Each figure is the mean over seeds with its 95% interval in brackets (Student's t over seeds; "
    "no interval from one seed). Detection is `k/n`: detected for k of n seeds, with its 95% Wilson "
    "interval. Per model and dataset, the first table gives per method: the detection statistic (Pearson "
    "r between the extracted and the inserted image, 0 for an unwatermarked model; or bit accuracy, 0.5 "
    "for an unwatermarked model), the clean error in % (100 x (1 - metric)), the imperceptibility (clean "
    "error minus the error of the same model trained without a watermark, per seed), detection without "
    "attack, the attacks that remove the mark (detected in no seed) for less than "
    f"{CHEAP_REMOVAL_POINTS:g} points of error_delta (with that cost and strength), and the training "
    "time in s per epoch. Then one table per attack, a row per method and strength (`clean`: no attack, "
    "the strength-0 rows of all attacks): the error after the attack, error_delta (error after minus "
    "clean error), the detection statistic, log10 of the detection p-value (from the log tail, finite "
    "where the p-value underflows to 0) and detection. `n/a`: not measured or not applicable."
)


@dataclass(frozen=True)
class CellStats:
    """One (method, attack, strength) cell over its seeds: each figure's mean with a 95% t interval
    over seeds, and in how many seeds the mark was detected (``hits`` of ``known``)."""

    error: Interval
    delta: Interval
    stat: Interval
    log10_p: Interval
    hits: int
    known: int

    @property
    def detection(self) -> str:
        """``k/n [low%, high%]`` (Wilson), or ``n/a``."""
        return share_text(self.hits, self.known)


@dataclass(frozen=True)
class Removal:
    """The cheapest tested strength of one attack at which the mark is detected in no seed: its
    strength and the error_delta it costs; ``strength`` None when no tested strength removes it,
    ``detected_clean`` False when the mark is not detected even without attack."""

    attack: str
    strength: float | None
    cost: Interval | None
    detected_clean: bool

    @property
    def cheap(self) -> bool:
        return self.cost is not None and self.cost.estimate < CHEAP_REMOVAL_POINTS

    @property
    def sort_key(self) -> float:
        """Cost for sorting: not removed sorts last, never detected first."""
        if not self.detected_clean:
            return -math.inf
        return math.inf if self.cost is None else self.cost.estimate

    def text(self, interval: bool = True) -> str:
        """``+cost [low, high] at strength`` (the interval left out when ``interval`` is False)."""
        if not self.detected_clean:
            return "not detected clean"
        if self.cost is None:
            return "not removed"
        cost = self.cost.text(signed=True) if interval else Interval(self.cost.estimate, math.nan, math.nan, 1).text(signed=True)
        return f"{cost} at {self.strength:g}"


@dataclass(frozen=True)
class MethodSummary:
    """A method on one model and dataset: clean figures over seeds and the removal cost per attack."""

    method: str
    statistic: str
    seeds: int
    clean_error: Interval
    imperceptibility: Interval
    train_s: Interval
    clean: CellStats
    removals: dict[str, Removal] = field(default_factory=dict)

    @property
    def cheap_removals(self) -> list[str]:
        return [attack for attack, removal in self.removals.items() if removal.cheap]


def log10_p(frame: pd.DataFrame) -> pd.Series:
    """``detect_log10_p``, or for rows without it (older CSVs) log10 of ``detect_pvalue`` where
    that is positive (a p-value that underflowed to 0 has no finite log there)."""
    given = pd.to_numeric(frame.get("detect_log10_p", pd.Series(np.nan, index=frame.index)), errors="coerce")
    pvalue = pd.to_numeric(frame["detect_pvalue"], errors="coerce").astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        fallback = np.log10(pvalue.where(pvalue > 0))
    return given.astype(float).fillna(fallback)


def cell_stats(rows: pd.DataFrame) -> CellStats:
    """Means over seeds (a seed's rows averaged first) and detections counted per seed (a seed
    counts as detected when all its rows are, as the clean rows repeated across attacks are)."""
    per_seed = rows.assign(_log10_p=log10_p(rows)).groupby("seed", dropna=False).agg(
        error=("error", "mean"), delta=("error_delta", "mean"), stat=("detect_stat", "mean"),
        log10_p=("_log10_p", "mean"), detected=("detected", _all_detected),
    )
    verdicts = [bool(v) for v in per_seed["detected"] if v is not pd.NA and v is not None and v == v]
    return CellStats(
        error=mean_interval(per_seed["error"]),
        delta=mean_interval(per_seed["delta"]),
        stat=mean_interval(per_seed["stat"]),
        log10_p=mean_interval(per_seed["log10_p"]),
        hits=sum(verdicts),
        known=len(verdicts),
    )


def attack_cells(group: pd.DataFrame, attack: str) -> list[tuple[str, float | None, CellStats]]:
    """(method, strength, stats) for every method: first clean (strength None, the strength-0 rows
    of every attack pooled), then each tested strength of ``attack`` in increasing order."""
    out: list[tuple[str, float | None, CellStats]] = []
    attacked = group[(group["attack"] == attack) & (group["strength"] != 0)]
    for method in sorted(group["method"].dropna().unique()):
        clean = group[(group["method"] == method) & (group["strength"] == 0)]
        if not clean.empty:
            out.append((method, None, cell_stats(clean)))
        mine = attacked[attacked["method"] == method]
        for strength in sorted(mine["strength"].dropna().unique()):
            out.append((method, float(strength), cell_stats(mine[mine["strength"] == strength])))
    return out


def attacks_of(group: pd.DataFrame) -> list[str]:
    """The attacks with at least one non-zero strength, sorted."""
    return sorted(group.loc[group["strength"] != 0, "attack"].dropna().unique())


def summarize(group: pd.DataFrame) -> list[MethodSummary]:
    """Per method of one (model, dataset) group, sorted by name."""
    out = []
    attacks = attacks_of(group)
    for method in sorted(group["method"].dropna().unique()):
        rows = group[group["method"] == method]
        per_seed = rows.assign(imperceptibility=rows["error_clean"] - rows["error_unwatermarked"]).groupby(
            "seed", dropna=False
        )[["error_clean", "imperceptibility", "train_s_per_epoch"]].mean()
        clean = cell_stats(rows[rows["strength"] == 0])
        out.append(MethodSummary(
            method=method,
            statistic=statistic_of(method),
            seeds=len(per_seed),
            clean_error=mean_interval(per_seed["error_clean"]),
            imperceptibility=mean_interval(per_seed["imperceptibility"]),
            train_s=mean_interval(per_seed["train_s_per_epoch"]),
            clean=clean,
            removals={a: removal(rows, a, clean) for a in attacks},
        ))
    return out


def removal(rows: pd.DataFrame, attack: str, clean: CellStats) -> Removal:
    """The strength of ``attack`` with the smallest mean error_delta among those where the mark is
    detected in none of the seeds (``rows`` are one method's)."""
    detected_clean = clean.hits > 0
    best: tuple[float, Interval] | None = None
    attacked = rows[(rows["attack"] == attack) & (rows["strength"] != 0)]
    for strength, sub in attacked.groupby("strength", sort=True):
        stats = cell_stats(sub)
        if stats.known and stats.hits == 0 and not math.isnan(stats.delta.estimate):
            if best is None or stats.delta.estimate < best[1].estimate:
                best = (float(strength), stats.delta)
    if best is None or not detected_clean:
        return Removal(attack, None, None, detected_clean)
    return Removal(attack, best[0], best[1], detected_clean)


def statistic_of(label: str) -> str:
    """The statistic a method label's detector reports ("pearson_r", "bit_accuracy", or "" when
    unknown): the registered method of that name, else of the longest registered name the label
    starts with (``watermas+align`` -> watermas)."""
    try:
        names = METHODS.names()
    except ConfigError:  # a broken plug-in entry point must not stop a leaderboard
        return ""
    candidates = [n for n in names if label == n or (label.startswith(n) and not label[len(n)].isalnum())]
    if not candidates:
        return ""
    cls = METHODS.get(max(candidates, key=len))
    return getattr(cls, "statistic", "") if getattr(cls, "statistic", "") in STATISTICS else ""


def statistic_label(kind: str) -> str:
    """``Pearson r (null 0)``, ``bit accuracy (null 0.5)``, or ``?`` for an unknown statistic."""
    if kind not in STATISTICS:
        return "?"
    name, null = STATISTICS[kind]
    return f"{name} (null {null:g})"


def detection_threshold(frame: pd.DataFrame) -> float | None:
    """The p-value threshold the rows were judged with (not stored in the CSV): the default 1e-6
    when the verdicts agree with it, else the smallest power of ten that does, else None."""
    known = frame.assign(_log10_p=log10_p(frame)).dropna(subset=["_log10_p"])
    known = known[known["detected"].notna() & np.isfinite(known["_log10_p"])]
    if known.empty:
        return None
    hit = known["detected"].astype(bool)
    high = known.loc[hit, "_log10_p"].max() if hit.any() else -math.inf  # detected: below the threshold
    low = known.loc[~hit, "_log10_p"].min() if (~hit).any() else math.inf  # not detected: at or above it
    if high < math.log10(DEFAULT_THRESHOLD) <= low:
        return DEFAULT_THRESHOLD
    exponent = math.floor(high) + 1 if math.isfinite(high) else None
    if exponent is not None and exponent <= low:
        return 10.0 ** exponent
    return None


def _all_detected(values: pd.Series) -> object:
    values = values.dropna()
    return pd.NA if values.empty else bool(values.astype(bool).all())
