"""The leaderboard's figures, as data: per-cell means with intervals over seeds, detection counts,
the cheapest removal per attack. The Markdown, HTML and plots render these; none computes its own."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from wmbench.errors import AT_CHANCE_NOTE, NOT_APPLIED_NOTE, RESYNC_FAILED_NOTE, ConfigError
from wmbench.statistic_kinds import STATISTIC_RANGES, STATISTICS
from wmbench.registry import METHODS
from wmbench.statistics import ANY, DELTA_RANGE, DURATION_RANGE, LOG10_P_RANGE, PERCENT_RANGE, Interval, mean_interval, share_text

# A removal that costs less than this many points of task error is "cheap" (the mark is worthless).
CHEAP_REMOVAL_POINTS = 2.0
# The fewest seeds a published figure rests on (fewer: a t interval too wide to cite, 2 seeds: the mean
# +- 12.7 standard errors); the null adds seeds up to it.
MIN_SEEDS = 3
DEFAULT_THRESHOLD = 1e-6


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
    unreadable: int = 0  # seeds without a verdict: the attacked model no longer fits the key, or its detector cannot judge it
    seeds: int = 0  # seeds whose row for this cell ran (the figures' n, at most)
    failed: int = 0  # seeds whose rows for this cell all failed: their figures are missing
    of: int = 0  # the seeds of the cell's model and dataset
    resync_failed: int = 0  # seeds whose resynchronised detection (resync: true) could not resync: plain detection

    @property
    def seeds_text(self) -> str:
        return seeds_text(self.seeds, self.failed, self.of)

    @property
    def detection(self) -> str:
        """``k/n [low%, high%]`` (Wilson) over the seeds with a verdict, then ``u unreadable`` for the
        seeds whose attacked model no longer fits the key, and ``r resync failed`` for the seeds whose
        verdict is plain detection's although their method asked for resync; ``n/a`` when none."""
        parts = [share_text(self.hits, self.known)] if self.known else []
        parts += [f"{self.unreadable} unreadable"] if self.unreadable else []
        parts += [f"{self.resync_failed} resync failed"] if self.resync_failed else []
        return "; ".join(parts) or "n/a"


@dataclass(frozen=True)
class Removal:
    """The cheapest tested strength of one attack at which the mark is detected in no seed: its
    strength and the error_delta it costs; ``strength`` None when no tested strength removes it,
    ``detected_clean`` False when the mark is not detected even without attack."""

    attack: str
    strength: float | None
    detected_clean: bool
    measured: bool = True  # False: no verdict at any tested strength (e.g. the attack did not apply)
    clean_known: bool = True  # False: no clean verdict at all (the method's cells failed)
    at: CellStats | None = None  # the figures of that strength (None: not removed)

    @property
    def cost(self) -> Interval | None:
        """The error_delta the removal costs."""
        return None if self.at is None else self.at.delta

    @property
    def unreadable(self) -> int:
        """Seeds of that strength without a verdict (see ``unreadable``)."""
        return 0 if self.at is None else self.at.unreadable

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
        if not self.clean_known:
            return "n/a"
        if not self.detected_clean:
            return "not detected clean"
        if not self.measured:
            return "detection n/a"
        if self.cost is None:
            return "not removed"
        at = self.at
        assert at is not None  # a cost comes with its strength's figures
        shown = at.delta if interval else Interval(at.delta.estimate, math.nan, math.nan, at.delta.n)
        cost = figure_text(shown, at.seeds, signed=True)
        notes = [f"{at.seeds} of {at.of} seeds: {', '.join(seed_notes(at.seeds, at.failed, at.of))}"] if at.seeds < at.of else []
        judged = at.known + at.unreadable  # seeds with an outcome: a verdict, or unreadable
        notes += _share(at.unreadable, judged, "unreadable") + _share(at.resync_failed, judged, "resync failed")
        return f"{cost} at {self.strength:g}" + (f" ({'; '.join(notes)})" if notes else "")


def _share(count: int, of: int, what: str) -> list[str]:
    """``what`` when it holds for all ``of`` seeds, ``count of of seeds what`` for some, nothing for none."""
    return [] if not count else [what] if count >= of else [f"{count} of {of} seeds {what}"]


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
    failed: int = 0  # seeds whose every row failed (a failed training)
    of: int = 0  # the seeds of the model and dataset
    at_chance: int = 0  # seeds whose clean model is at chance accuracy (``at_chance_rows``)

    @property
    def seeds_text(self) -> str:
        return seeds_text(self.seeds, self.failed, self.of)

    @property
    def at_chance_mark(self) -> str:
        """What follows the clean error: ``" (at chance)"``, ``" (at chance in 1 of 3 seeds)"``, or ""."""
        if not self.at_chance:
            return ""
        return " (at chance)" if self.at_chance >= self.seeds else f" (at chance in {self.at_chance} of {self.seeds} seeds)"

    @property
    def cheap_removals(self) -> list[str]:
        return [attack for attack, removal in self.removals.items() if removal.cheap]


def seeds_text(seeds: int, failed: int, of: int) -> str:
    """``seeds`` of ``of``, and why the others are missing: ``2 of 3 (1 failed; under 3 seeds)``,
    ``2 of 3 (1 not run; ...)``; ``3`` when every seed counts. A figure from fewer than MIN_SEEDS
    seeds is marked: its interval is too wide to cite, or missing (one seed)."""
    text = str(seeds) if seeds >= of else f"{seeds} of {of}"
    notes = seed_notes(seeds, failed, of)
    return f"{text} ({'; '.join(notes)})" if notes else text


def seed_notes(seeds: int, failed: int, of: int) -> list[str]:
    """Why ``of - seeds`` seeds are missing and whether ``seeds`` is too few: ``1 failed``, ``1 not
    run``, ``under 3 seeds`` (``seeds_text``'s bracket)."""
    notes = [f"{failed} failed"] if failed else []
    notes += [f"{of - seeds - failed} not run"] if of - seeds - failed > 0 else []
    notes += [f"under {MIN_SEEDS} seeds"] if 0 < seeds < MIN_SEEDS else []
    return notes


def figure_text(interval: Interval, seeds: int, digits: int = 2, signed: bool = False) -> str:
    """``interval``'s text, marked ``(2 seeds)`` when it rests on fewer seeds than its row's
    ``seeds``: the value is missing (NaN, an empty CSV cell) in the other seeds' rows, and the mean
    is over those that have it (``mean_interval`` drops NaN)."""
    text = interval.text(digits, signed)
    return f"{text} ({interval.n} seed{'s' if interval.n > 1 else ''})" if 0 < interval.n < seeds else text


def log10_p(frame: pd.DataFrame) -> pd.Series:
    """``detect_log10_p``, or for rows without it (older CSVs) log10 of ``detect_pvalue`` where
    that is positive (a p-value that underflowed to 0 has no finite log there)."""
    given = pd.to_numeric(frame.get("detect_log10_p", pd.Series(np.nan, index=frame.index)), errors="coerce")
    pvalue = pd.to_numeric(frame["detect_pvalue"], errors="coerce").astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        fallback = np.log10(pvalue.where(pvalue > 0))
    return given.astype(float).fillna(fallback)


@dataclass(frozen=True)
class GroupSummary:
    """Everything the renderers show for one (model, dataset) group, computed once: its attacks, the
    per-method summaries and, per attack, the ``attack_cells`` rows."""

    model: object
    dataset: object
    rows: pd.DataFrame
    attacks: list[str]
    methods: list[MethodSummary]
    cells: dict[str, list[tuple[str, float | None, CellStats]]]


_FIGURES = ["error", "delta", "stat", "log10_p"]


def summarize_frame(frame: pd.DataFrame) -> list[GroupSummary]:
    """One GroupSummary per (model, dataset), in sorted order (missing labels last)."""
    return [
        summarize_group(group, model, dataset)
        for (model, dataset), group in frame.groupby(["model", "dataset"], sort=True, dropna=False)
    ]


def summarize_group(group: pd.DataFrame, model: object = None, dataset: object = None) -> GroupSummary:
    """The figures of one (model, dataset) group from three vectorised groupbys over its rows: per
    (method, attack, strength, seed) for the attacked cells, per (method, seed) for the clean rows
    (strength 0 of every attack pooled) and for the per-method clean figures."""
    attacks = attacks_of(group)
    methods = sorted(group["method"].dropna().unique())
    figures = _seed_figures(group)
    kinds = statistics_of(group)
    of = int(group["seed"].nunique(dropna=False))  # the seeds the model and dataset were run with
    clean = _cells(figures[figures["strength"] == 0], ["method"], kinds, of)
    attacked = figures[(figures["strength"] != 0) & figures["strength"].notna()]
    attacked = attacked[attacked["attack"].isin(attacks)]
    by_attack = _cells(attacked, ["method", "attack", "strength"], kinds, of)
    cells: dict[str, list[tuple[str, float | None, CellStats]]] = {}
    for attack in attacks:
        out: list[tuple[str, float | None, CellStats]] = []
        for method in methods:
            if (method,) in clean:
                out.append((method, None, clean[(method,)]))
            out += [(method, float(k[2]), c) for k, c in by_attack.items() if k[0] == method and k[1] == attack]
        cells[attack] = out
    summaries = []
    per_method = _method_figures(group)
    chance = at_chance_rows(group)
    for method in methods:
        per_seed = per_method[method]
        stats = clean.get((method,), _EMPTY)
        ran = group.loc[(group["method"] == method) & group["failure"].isna(), "seed"].unique()
        failed = group.loc[(group["method"] == method) & group["failure"].notna() & ~group["seed"].isin(ran), "seed"]
        summaries.append(MethodSummary(
            method=method,
            statistic=kinds.get(method, ""),
            seeds=int(per_seed["error_clean"].notna().sum()),  # a seed whose training failed has none
            clean_error=mean_interval(per_seed["error_clean"], bounds=PERCENT_RANGE),
            imperceptibility=mean_interval(per_seed["imperceptibility"], bounds=DELTA_RANGE),
            train_s=mean_interval(per_seed["train_s_per_epoch"], bounds=DURATION_RANGE),
            clean=stats,
            removals={a: _removal(a, [(s, c) for m, s, c in cells[a] if m == method and s is not None], stats) for a in attacks},
            failed=int(failed.nunique(dropna=False)),
            of=of,
            at_chance=int(group.loc[(group["method"] == method) & chance, "seed"].nunique(dropna=False)),
        ))
    return GroupSummary(model, dataset, group, attacks, summaries, cells)


def failed_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows with a ``failure``, one line per (model, dataset, method, reason): the attacks and
    seeds it hit and the number of cells it took. Their figures are missing from every table."""
    columns = ["model", "dataset", "method", "attacks", "seeds", "cells", "failure"]
    if "failure" not in frame:
        return pd.DataFrame(columns=columns)
    failed = frame[frame["failure"].notna()]
    grouped = failed.groupby(["model", "dataset", "method", "failure"], sort=True, dropna=False)
    out = grouped.agg(
        attacks=("attack", lambda attacks: ", ".join(sorted(str(a) for a in attacks.dropna().unique()))),
        seeds=("seed", lambda seeds: ", ".join(f"{s:g}" for s in sorted(seeds.dropna().unique()))),
        cells=("seed", "size"),
    )
    return out.reset_index()[columns]


def _seed_figures(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows' keys and figures under short names, with the verdict as counts: ``known`` (1 when
    the row has one) and ``misses`` (1 when it is False), so that summing them per seed tells
    whether the seed counts as detected (all its known verdicts true) or is unknown (none known)."""
    detected = rows["detected"]
    frame = pd.DataFrame({
        "method": rows["method"], "attack": rows["attack"], "strength": rows["strength"], "seed": rows["seed"],
        "error": rows["error"], "delta": rows["error_delta"], "stat": rows["detect_stat"], "log10_p": log10_p(rows),
        "known": detected.notna().astype(int), "misses": (detected == False).fillna(False).astype(int),  # noqa: E712
        "unreadable": unreadable(rows).astype(int), "resync_failed": resync_failed(rows).astype(int),
        "failed": rows["failure"].notna().astype(int), "rows": 1,
    })
    return frame


def unreadable(rows: pd.DataFrame) -> pd.Series:
    """Attacked rows evaluated without a verdict although the same training gave one unattacked:
    the attacked model no longer fits the key (its shapes or names changed) or its detector cannot
    judge it (a null collapsed by the attack), so its owner cannot show the mark. Not an attack that did not apply (``NOT_APPLIED_NOTE``) nor a failed cell."""
    keys = ["model", "dataset", "method", "seed"]
    read_clean = pd.MultiIndex.from_frame(rows.loc[(rows["strength"] == 0) & rows["detected"].notna(), keys].astype(str))
    had_verdict = pd.MultiIndex.from_frame(rows[keys].astype(str)).isin(read_clean)
    not_applied = rows["detect_note"].fillna("").astype(str).str.startswith(NOT_APPLIED_NOTE)
    return pd.Series(had_verdict, index=rows.index) & (rows["strength"] != 0) & rows["detected"].isna() \
        & rows["metric_value"].notna() & rows["failure"].isna() & ~not_applied


_RESYNC_FAILED = re.compile(rf"(?:^|; ){re.escape(RESYNC_FAILED_NOTE)} \(")


def resync_failed(rows: pd.DataFrame) -> pd.Series:
    """Rows whose method entry asked for resynchronised detection but whose resync could not run
    (``detect_note`` holds ``RESYNC_FAILED_NOTE``, as wmbench.detection writes it): their verdict
    and statistic are plain detection's."""
    return rows["detect_note"].fillna("").astype(str).str.contains(_RESYNC_FAILED)


_AT_CHANCE = re.compile(rf"(?:^|; ){re.escape(AT_CHANCE_NOTE)} \(")


def at_chance_rows(rows: pd.DataFrame) -> pd.Series:
    """Rows whose training's clean model is at chance accuracy (``detect_note`` holds
    ``AT_CHANCE_NOTE``, as wmbench.worker writes it): their figures do not measure a watermark's cost."""
    return rows["detect_note"].fillna("").astype(str).str.contains(_AT_CHANCE)


def _cells(figures: pd.DataFrame, keys: list[str], kinds: dict[str, str], of: int = 0) -> dict[tuple, CellStats]:
    """CellStats per ``keys`` (the method first; sorted; rows with a missing key left out, a missing
    seed kept as one); ``kinds``: each method's statistic, whose range bounds its interval; ``of``:
    the seeds of the model and dataset (a seed without a row was not run)."""
    figures = figures.dropna(subset=keys)
    if figures.empty:
        return {}
    grouped = figures.groupby([*keys, "seed"], sort=True, dropna=False)
    per_seed = grouped[_FIGURES].mean().join(grouped[["known", "misses", "unreadable", "resync_failed", "failed", "rows"]].sum())
    out: dict[tuple, CellStats] = {}
    for key, seeds in per_seed.groupby(level=list(range(len(keys))), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        known = seeds["known"].to_numpy() > 0
        failed = seeds["failed"].to_numpy() == seeds["rows"].to_numpy()  # a seed that ran in another row (clean) counts
        out[key] = CellStats(
            error=mean_interval(seeds["error"], bounds=PERCENT_RANGE),
            delta=mean_interval(seeds["delta"], bounds=DELTA_RANGE),
            stat=mean_interval(seeds["stat"], bounds=STATISTIC_RANGES.get(kinds.get(key[0], ""), ANY)),
            log10_p=mean_interval(seeds["log10_p"], bounds=LOG10_P_RANGE),
            hits=int((seeds["misses"].to_numpy()[known] == 0).sum()),
            known=int(known.sum()),
            unreadable=int(((seeds["unreadable"].to_numpy() > 0) & ~known).sum()),
            seeds=int((~failed).sum()),
            failed=int(failed.sum()),
            of=max(of, len(seeds)),
            resync_failed=int((seeds["resync_failed"].to_numpy() > 0).sum()),
        )
    return out


def _method_figures(group: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per method: the per-seed means of error_clean, imperceptibility and train s/epoch."""
    frame = group.dropna(subset=["method"])
    frame = frame.assign(imperceptibility=frame["error_clean"] - frame["error_unwatermarked"])
    per_seed = frame.groupby(["method", "seed"], sort=True, dropna=False)[["error_clean", "imperceptibility", "train_s_per_epoch"]].mean()
    return {method: seeds.droplevel(0) for method, seeds in per_seed.groupby(level=0, sort=False)}


_NA = Interval(math.nan, math.nan, math.nan, 0)
_EMPTY = CellStats(_NA, _NA, _NA, _NA, 0, 0)


def _removal(attack: str, tested: list[tuple[float, CellStats]], clean: CellStats) -> Removal:
    """The tested strength with the smallest mean error_delta among those where the mark is detected
    in none of the seeds (``tested`` in increasing strength). A seed whose attacked model no longer
    fits the key (detection not applicable) counts as not detected: its owner cannot show the mark.
    Its text says when that strength's row rests on fewer seeds than the model and dataset's (as its
    attack table row's ``seeds`` does)."""
    detected_clean = clean.hits > 0
    best: tuple[float, CellStats] | None = None
    for strength, stats in tested:
        if stats.known + stats.unreadable and stats.hits == 0 and not math.isnan(stats.delta.estimate):
            if best is None or stats.delta.estimate < best[1].delta.estimate:
                best = (strength, stats)
    measured = any(stats.known + stats.unreadable for _, stats in tested)
    if best is None or not detected_clean:
        return Removal(attack, None, detected_clean, measured, clean.known > 0)
    return Removal(attack, best[0], detected_clean, measured, at=best[1])


def attack_cells(group: pd.DataFrame, attack: str) -> list[tuple[str, float | None, CellStats]]:
    """(method, strength, stats) for every method: first clean (strength None, the strength-0 rows
    of every attack pooled), then each tested strength of ``attack`` in increasing order."""
    return summarize_group(group).cells.get(attack, [])


def attacks_of(group: pd.DataFrame) -> list[str]:
    """The attacks with at least one non-zero strength, sorted."""
    return sorted(group.loc[group["strength"] != 0, "attack"].dropna().unique())


def summarize(group: pd.DataFrame) -> list[MethodSummary]:
    """Per method of one (model, dataset) group, sorted by name."""
    return summarize_group(group).methods


def statistics_of(frame: pd.DataFrame) -> dict[str, str]:
    """Method label -> its statistic: the one its rows carry (``statistic`` column, written since
    it exists; a name this wmbench does not know, a newer version's, kept as written), else
    ``statistic_of(label)`` (older CSVs, rows of a method that declares none)."""
    carried = frame.get("statistic", pd.Series(None, index=frame.index, dtype=object))
    out: dict[str, str] = {}
    for method, kind in zip(frame["method"], carried):
        if isinstance(method, str) and isinstance(kind, str) and kind.strip():
            out.setdefault(method, kind)
    for method in frame["method"].dropna().unique():
        if method not in out:
            out[method] = statistic_of(method)
    return out


def statistic_of(label: str) -> str:
    """The statistic a method label's detector reports (a key of STATISTICS, or "" when
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
    if exponent is not None and -307 <= exponent <= min(low, 0):  # a threshold in (0, 1) that float64 holds
        return 10.0 ** exponent
    return None
