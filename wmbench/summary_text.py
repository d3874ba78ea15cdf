"""The leaderboard's page-level texts: the legend, the failed-cells note, each statistic's label
and what the rows were measured with. The figures and their own short texts are ``wmbench.summary``'s."""

from __future__ import annotations

from typing import Callable

import pandas as pd

from wmbench.statistic_kinds import STATISTICS
from wmbench.summary import CHEAP_REMOVAL_POINTS, MIN_SEEDS, MethodSummary

LEGEND = (
    "Each figure is the mean over seeds with its 95% interval in brackets (Student's t over seeds, "
    "cut to the range the figure can take, e.g. a bit accuracy's [0, 1]; no interval from one seed). Detection is `k/n`: detected for k of n seeds, with its 95% Wilson "
    "interval. Per model and dataset, the first table gives per method: the detection statistic (Pearson "
    "r between the extracted and the inserted image, 0 for an unwatermarked model; bit accuracy, 0.5 "
    "for an unwatermarked model; or a z score against unrelated readings, 0 for an unwatermarked model), the clean error in % (100 x (1 - metric)), the imperceptibility (clean "
    "error minus the error of the same model trained without a watermark, per seed), detection without "
    "attack, the attacks that remove the mark (detected in no seed; `unreadable`: the attacked model "
    "no longer fits the key or its detector cannot judge it (a collapsed null), so its owner cannot show the mark; `resync failed`: a `resync: true` method's "
    "resynchronisation could not run, the verdict is plain detection's, see `detect_note`) for less than "
    f"{CHEAP_REMOVAL_POINTS:g} points of error_delta (with that cost and strength), and the training "
    "time in s per epoch. Then one table per attack, a row per method and strength (`clean`: no attack, "
    "the strength-0 rows of all attacks): the error after the attack, error_delta (error after minus "
    "clean error), the detection statistic, log10 of the detection p-value (from the log tail, finite "
    "where the p-value underflows to 0) and detection. `seeds`: how many seeds a row's figures rest on "
    "(`2 of 3`: of the 3 its model and dataset were run with), with why the others are missing: `failed` (its "
    "cell failed, see the failed cells; a rerun retries it) or `not run` (no row yet); `under "
    f"{MIN_SEEDS} seeds`: an interval too wide to cite, or none. A figure marked `(2 seeds)` rests on fewer seeds "
    "than its row: the others' rows lack it (empty in the CSV). `n/a`: not measured or not applicable."
)

FAILED_NOTE = (
    "Cells that could not run (column `failure` of the CSV): a training that failed takes every cell "
    "of its seed, and none of their figures is in the tables above. Rerunning the same command retries them."
)


def at_chance_text(methods: list[MethodSummary], label: Callable[[str], str] = str,
                   code: Callable[[str], str] = "`{}`".format) -> str | None:
    """The note under a (model, dataset) summary whose methods' clean models are at chance accuracy
    (``MethodSummary.at_chance``), or None where none is; each method's label as ``label`` renders
    it (escaped for Markdown or HTML: a label is data), a column name as ``code`` does."""
    marked = [f"{label(s.method)} ({s.at_chance} of {s.seeds} seeds)" for s in methods if s.at_chance]
    if not marked:
        return None
    return (f"At chance: the clean model is at chance accuracy for {', '.join(marked)} (see {code('detect_note')}): "
            "the model has not learned its task, so those methods' attack and detection figures do not measure a watermark's cost.")


def statistic_label(kind: str) -> str:
    """``Pearson r (null 0)``, ``bit accuracy (null 0.5)``; ``not declared`` for none (a method's
    ``statistic = ""``, or a label without a registered method in rows that name none); a name this
    wmbench does not know (a newer version's rows) as written, ``cosine (null unknown)``."""
    if not kind:
        return "not declared"
    if kind not in STATISTICS:
        return f"{kind} (null unknown)"
    name, null = STATISTICS[kind]
    return f"{name} (null {null:g})"


def joined_values(values: pd.Series) -> str:
    """A column's distinct values, sorted and comma-separated; ``n/a`` when it has none."""
    return ", ".join(sorted({str(v) for v in values.dropna()})) or "n/a"


def run_meta(frame: pd.DataFrame) -> str:
    """What the rows were measured with, for the top of a leaderboard: scenario, wmbench version,
    training epochs, row count, device and torch threads (runs compare only at equal ones), and the
    machine's reference training speed where recorded."""
    meta = f"scenario: {joined_values(frame['scenario'])}; wmbench version: {joined_values(frame['wmbench_version'])}{epochs_note(frame)}; {len(frame)} result rows"
    if "device" in frame and frame["device"].notna().any():
        threads = numbers_text(frame["torch_threads"])
        meta += f"; device: {joined_values(frame['device'])}; torch threads: {threads or 'n/a'}"
    if "reference_images_per_s" in frame and frame["reference_images_per_s"].notna().any():
        speeds = pd.to_numeric(frame["reference_images_per_s"], errors="coerce").dropna()
        meta += f"; reference training speed (wmbench.machine_speed): {speeds.min():.0f}-{speeds.max():.0f} images/s"
    return meta


def epochs_note(frame: pd.DataFrame) -> str:
    """``"; training epochs: 8"`` from the rows' ``epochs`` column, or "" where no row records it."""
    epochs = numbers_text(frame["epochs"]) if "epochs" in frame else ""
    return f"; training epochs: {epochs}" if epochs else ""


def numbers_text(values: pd.Series) -> str:
    """A column's distinct numbers in increasing order, comma-separated (``2, 16``, not ``16, 2``);
    "" when it has none."""
    return ", ".join(f"{v:g}" for v in sorted(set(pd.to_numeric(values, errors="coerce").dropna())))
