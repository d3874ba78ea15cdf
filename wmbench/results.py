"""The results store: one JSON line per finished cell, appended atomically; read back as a table."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import pandas as pd

from wmbench.errors import WmbenchError
from wmbench.names import control_chars, shown
from wmbench.safe_io import append_line, read_bytes

# The result row, in CSV order.
COLUMNS = [
    "scenario", "model", "dataset", "method", "seed", "attack", "strength", "metric", "metric_value",
    "error", "error_clean", "error_delta", "error_unwatermarked", "detect_stat", "detect_pvalue",
    "detected", "train_s_per_epoch", "attack_s", "eval_s", "wmbench_version",
    "attack_effect", "detect_note", "peak_mem_mb", "detect_log10_p", "torch_threads", "device", "failure",
    "statistic", "data_digest", "reference_images_per_s", "epochs",
]
TIMING_COLUMNS = ["train_s_per_epoch", "attack_s", "eval_s"]
# Measured, so they differ between two runs of the same scenario; every other column is reproducible
# (compare results without them).
MEASURED_COLUMNS = [*TIMING_COLUMNS, "peak_mem_mb", "reference_images_per_s"]


# The columns that say which cell a row belongs to; a stored row must match its cell on each.
IDENTITY_COLUMNS = ["scenario", "model", "dataset", "method", "seed", "attack", "strength"]
MAX_SEED = 2**53  # the largest seed a float (a CSV cell, the leaderboard's seed column) holds exactly
CSV_FLOAT_FORMAT = "%.6g"  # how result CSVs write numbers: values that print alike are one leaderboard row
_TEXT = {"scenario", "model", "dataset", "method", "attack", "metric", "wmbench_version", "detect_note", "device", "failure", "statistic", "data_digest"}
# The text columns that label a row in every table: a scenario refuses control characters in them
# (names.name_problem); a row read from a file that holds some is skipped, never rendered.
_LABELS = {"scenario", "model", "dataset", "method", "attack", "metric"}

log = logging.getLogger(__name__)
Row = TypeVar("Row")  # a result row (a mapping), or what names one (a CSV row's number)


class ResultStore:
    """Append-only JSONL file of rows keyed by ``cell_id``; a torn last line (crash) is ignored."""

    def __init__(self, path: Path, in_cache: bool = False) -> None:
        self.path = path
        self.in_cache = in_cache  # the cache's own store (no --store): a foreign file there is damage, set aside
        self._foreign = False  # rows() found such damage: append() sets it aside first (a dry run never does)

    def rows(self, expected: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """cell_id -> row, for every complete line. With ``expected`` (cell_id -> identity), only
        rows of those cells that pass ``row_problem`` are returned: a bad row (edited, foreign,
        from another scenario) is set aside, so its cell runs again and its new row wins."""
        out: dict[str, dict[str, Any]] = {}
        if self.path.exists() and not self.path.is_file():
            raise WmbenchError(f"{self.path}: not a file (--store takes a results store, a .jsonl file)")
        try:
            raw = read_bytes(self.path)
        except FileNotFoundError:
            return out
        first = raw.lstrip().split(b"\n", 1)[0]
        if first and not first.startswith(b"{"):  # rows are appended whole: not a store
            if self.in_cache:  # damage: its cells run again, and the first row written sets it aside
                log.warning("%s: not a results store (its first line is not a JSON row): its cells run again", self.path)
                self._foreign = True
                return out
            raise WmbenchError(f"{self.path}: not a wmbench results store (its first line is not a JSON row; a leaderboard CSV?): "
                               "--store takes the .jsonl file wmbench run writes")
        bad = 0
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # a line cut short by a crash
            if not (isinstance(row, dict) and isinstance(row.get("cell_id"), str)):
                continue
            if expected is not None:
                identity = expected.get(row["cell_id"])
                if identity is None:
                    continue
                if row_problem(row, identity):
                    bad += 1
                    continue
            out[row["cell_id"]] = row
        if bad:
            log.warning("%s: %d stored rows do not match their cells and are recomputed", self.path, bad)
        return out

    def append(self, cell_id: str, row: dict[str, Any]) -> None:
        """Write one row with a single write() and fsync, so it is either whole or absent."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._foreign:
            with contextlib.suppress(FileNotFoundError):  # another run sharing the cache did it first
                os.replace(self.path, self.path.with_name(f"{self.path.name}.damaged-{os.getpid()}-{secrets.token_hex(3)}"))
            self._foreign = False
        line = json.dumps({"cell_id": cell_id, **row}, sort_keys=True) + "\n"
        append_line(self.path, line.encode("utf-8"))


def row_problem(row: Mapping[str, Any], identity: Mapping[str, Any]) -> str | None:
    """Why a stored row is not a valid row of the cell ``identity`` describes, or None."""
    for column, value in identity.items():
        if column not in row:
            return f"no {column}"
        stored = row[column]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(stored, bool) or not isinstance(stored, (int, float)) or float(stored) != float(value):
                return f"{column} is not {value}"
        elif stored != value:
            return f"{column} is not {value!r}"
    return _types_problem(row)


def readable_problem(row: Mapping[str, Any]) -> str | None:
    """Why a row read from a file cannot be rendered (``identity_problem``, or a column of the wrong
    type), or None. The leaderboard's and the null's reader both skip such rows (``readable_rows``)."""
    return identity_problem(row) or _types_problem(row)


def identity_problem(row: Mapping[str, Any]) -> str | None:
    """Why ``row``'s identity cannot be read, or None: every identity column present, its labels text
    (or missing), its seed an integer in [0, 2**53] and its strength a finite number >= 0 (as a
    scenario's seeds and strengths are)."""
    for column in IDENTITY_COLUMNS:
        if column not in row:
            return f"no {column}"
    seed, strength = row["seed"], row["strength"]
    if not (_number(seed) and abs(seed) <= MAX_SEED and float(seed).is_integer()):  # NaN: not <=
        return f"seed {shown(seed)} is not an integer"
    if seed < 0:
        return f"seed {shown(seed)} is negative"
    if not (_number(strength) and abs(strength) <= sys.float_info.max):
        return f"strength {shown(strength)} is not a number"
    if strength < 0:
        return f"strength {shown(strength)} is negative (an attack's strengths are >= 0)"
    return _types_problem({c: row[c] for c in IDENTITY_COLUMNS})


def readable_rows(rows: Iterable[Row], source: object, problem: Callable[[Row], str | None] = readable_problem) -> list[Row]:
    """The rows ``problem`` passes; the others are skipped with one warning naming ``source``, how
    many and why the first was."""
    kept: list[Row] = []
    problems: list[str] = []
    for row in rows:
        why = problem(row)
        if why is None:
            kept.append(row)
        else:
            problems.append(why)
    if problems:
        log.warning("%s: skipped %d result rows that cannot be read (the first: %s)", source, len(problems), problems[0])
    return kept


def _types_problem(row: Mapping[str, Any]) -> str | None:
    """Which known column of ``row`` has a value of the wrong type or out of its range (``_RANGES``),
    or None (missing values pass)."""
    for column, value in row.items():
        if value is None or column not in COLUMNS:
            continue
        if column in _TEXT:
            if not isinstance(value, str):
                return f"{column} is not text"
            if column in _LABELS and control_chars(value):  # an escape sequence, a bidi override, a line break
                return f"{column} {shown(value)} holds control characters"
        elif column == "detected":
            if not isinstance(value, bool):
                return "detected is not a boolean"
        elif not _number(value):
            return f"{column} is not a number"
        elif column in _RANGES and not _RANGES[column][0] <= value <= _RANGES[column][1]:  # NaN: not <=
            return f"{column} {value} is outside {list(_RANGES[column])}"
    return None


# Columns whose values only a hand edit puts outside these ranges (errors in percent; NaN is outside
# every range). A statistic is finite (wmbench.api.Detection), a log10 p-value at most 0 (-inf: a
# p-value of 0 in rows written before it came from the log tail), an error difference within
# [-100, 100], a time, a memory peak or a throughput finite and not negative.
_FINITE = sys.float_info.max
_RANGES = {
    "metric_value": (0.0, 1.0), "detect_pvalue": (0.0, 1.0), "error": (0.0, 100.0), "error_clean": (0.0, 100.0),
    "error_delta": (-100.0, 100.0), "error_unwatermarked": (0.0, 100.0), "detect_stat": (-_FINITE, _FINITE),
    "detect_log10_p": (-math.inf, 0.0), **{c: (0.0, _FINITE) for c in (*TIMING_COLUMNS, "peak_mem_mb", "reference_images_per_s")},
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def judge(rows: Iterable[dict[str, Any]], threshold: float) -> None:
    """Set each row's ``detected`` from its p-value at ``threshold`` (below it: detected), in place;
    rows without a p-value or a verdict keep theirs. A store holds verdicts judged at whatever
    threshold each row was measured under."""
    for row in rows:
        if _number(row.get("detect_pvalue")) and row.get("detected") is not None:
            row["detected"] = row["detect_pvalue"] < threshold


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly the CSV columns, in order."""
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS]


# The registered name of the unwatermarked reference method. A stored row records its method's
# name in ``method_name`` (a store's field, not a CSV column); rows written before it did have none.
REFERENCE_METHOD = "none"


def reference_labels(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """The labels of the unwatermarked reference among stored rows, found as ``wmbench run`` finds
    it: by the method's name, ``none``, whatever its label (``{name: none, label: unwm}``). A row
    that records no method name (an older store) counts where its label is ``none``."""
    return {
        r.get("method") for r in rows
        if r.get("method_name") == REFERENCE_METHOD or ("method_name" not in r and r.get("method") == REFERENCE_METHOD)
    }


def join_unwatermarked(rows: list[dict[str, Any]], reference_labels: set[str]) -> list[dict[str, Any]]:
    """Each row's ``error_unwatermarked``: the clean error of the same model, dataset and seed
    trained by the unwatermarked reference (the methods labelled ``reference_labels``); where that
    training is missing or failed, the row keeps the value it has (else None). The rows are changed
    in place and returned."""
    clean = {
        (r["model"], r["dataset"], r["seed"]): r["error_clean"]
        for r in rows
        if r.get("method") in reference_labels and r.get("error_clean") is not None  # failed cells have none
    }
    for row in rows:
        row["error_unwatermarked"] = clean.get((row.get("model"), row.get("dataset"), row.get("seed")), row.get("error_unwatermarked"))
    return rows
