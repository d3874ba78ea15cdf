"""The published leaderboard: a results table rendered as CSV, Markdown pivot tables and plots."""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from wmbench.errors import WmbenchError
from wmbench.names import check_entries, csv_cell, csv_uncell, inside, md_cell, shown
from wmbench.plots import PLOT_SUFFIXES, plot_leaderboard
from wmbench.report_html import render_html
from wmbench.results import (
    COLUMNS, CSV_FLOAT_FORMAT, IDENTITY_COLUMNS, MAX_SEED, MEASURED_COLUMNS, join_unwatermarked, judge, readable_problem, readable_rows,
    reference_labels, to_frame,
)
from wmbench.summary import CHEAP_REMOVAL_POINTS, DEFAULT_THRESHOLD, GroupSummary, failed_cells, figure_text, summarize_frame
from wmbench.summary_text import FAILED_NOTE, LEGEND, at_chance_text, joined_values, run_meta, statistic_label

SORT_KEYS = ["model", "dataset", "method", "attack", "strength", "seed", "scenario", "metric"]
NUMERIC_COLUMNS = [
    "seed", "strength", "metric_value", "error", "error_clean", "error_delta", "error_unwatermarked",
    "detect_stat", "detect_pvalue", "train_s_per_epoch", "attack_s", "eval_s", "attack_effect",
    "detect_log10_p", "torch_threads", "peak_mem_mb", "reference_images_per_s", "epochs",
]
TEXT_COLUMNS = [c for c in COLUMNS if c not in NUMERIC_COLUMNS and c != "detected"]
# Six significant digits: stable against last-bit float noise, and write -> read -> write is a fixed point.
FLOAT_FORMAT = CSV_FLOAT_FORMAT
NA = "n/a"
_TRUE = {"true", "1", "1.0", "yes"}
_FALSE = {"false", "0", "0.0", "no"}
log = logging.getLogger(__name__)


# The columns without which a file is not a results table (older CSVs may lack later columns).
REQUIRED_COLUMNS = ["scenario", "model", "dataset", "method", "seed", "attack", "strength"]


def read_results(path: Path, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """A published CSV, or a ``.jsonl`` results store (torn lines skipped, last row per cell_id wins;
    its verdicts judged again at ``threshold``, as ``wmbench run`` judges them at the scenario's).
    Rows whose identity cannot be read (a seed ``inf``, an empty strength: a CSV cut short) are
    skipped with a warning; anything else (a binary, a YAML file, a CSV of other columns, no row
    left) is a WmbenchError naming the file. Rows of several scenarios, or of one cell with
    different results, are kept (and averaged) with a warning."""
    frame = _read_table(path, threshold)
    if frame.empty:
        raise WmbenchError(f"{path}: not a results file (no result row)")
    for warning in combined_warnings(frame):
        log.warning("%s: %s", path, warning)
    return frame


def combined_warnings(frame: pd.DataFrame) -> list[str]:
    """What averaging ``frame`` mixes: rows of several scenarios, and cells (one identity) whose
    rows differ in a result column (measured timings aside)."""
    out = []
    scenarios = sorted({str(v) for v in frame["scenario"].dropna()})
    if len(scenarios) > 1:
        out.append(f"rows of {len(scenarios)} scenarios are combined: {', '.join(map(shown, scenarios[:5]))}")
    values = [c for c in COLUMNS if c not in IDENTITY_COLUMNS and c not in MEASURED_COLUMNS]
    counts = frame.groupby(IDENTITY_COLUMNS, dropna=False)[values].nunique(dropna=False)
    clashing = counts[(counts > 1).any(axis=1)]
    if len(clashing):
        labels = [getattr(v, "item", lambda: v)() for v in clashing.index[0]]  # numpy scalars as Python
        first = ", ".join(f"{c} {shown(v)}" for c, v in zip(IDENTITY_COLUMNS, labels))
        n = len(clashing)
        out.append(f"{n} {'cell has' if n == 1 else 'cells have'} rows with different results, averaged (the first: {first})")
    return out


def _read_table(path: Path, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """``path``'s readable rows, normalized (``read_results`` without its checks of the whole)."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            rows = _jsonl_rows(path)
            judge(rows, threshold)
            frame = to_frame(join_unwatermarked(rows, reference_labels(rows)))  # method none, whatever its label
        else:
            frame, extra_fields = _csv_frame(path)
            for column in [c for c in TEXT_COLUMNS if c in frame.columns]:
                frame[column] = [csv_uncell(v) if isinstance(v, str) else v for v in frame[column]]
    except UnicodeDecodeError:
        raise WmbenchError(f"{path}: not a results file (not UTF-8 text)") from None
    except (csv.Error, ValueError) as exc:
        raise WmbenchError(f"{path}: not a results CSV ({type(exc).__name__}: {str(exc)[:200]})") from None
    except OSError as exc:
        raise WmbenchError(f"{path}: cannot read: {exc.strerror or type(exc).__name__}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise WmbenchError(f"{path}: not a results file (no column {', '.join(missing[:3])})")
    if path.suffix != ".jsonl":
        frame = _readable_csv_rows(frame, extra_fields, path)
    return normalize(frame)


def _csv_frame(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """The wmbench columns of the CSV at ``path``, every cell as text (empty cells missing), and how
    many fields each row had (a row cut short, or run into the next, has not as many as the header)."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a long failure message is one field
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = [row for row in csv.reader(fh) if row]  # blank lines skipped
    if not rows:
        raise ValueError("no header")
    header = rows[0]
    twice = sorted({c for c in header if c in COLUMNS and header.count(c) > 1})
    if twice:
        raise ValueError(f"column {twice[0]!r} twice")
    kept = [i for i, c in enumerate(header) if c in COLUMNS]  # other columns (a spreadsheet's) are not read
    cells = [[row[i] if i < len(row) else "" for i in kept] for row in rows[1:]]
    frame = pd.DataFrame(cells, columns=[header[i] for i in kept], dtype=object)
    return frame.mask(frame == ""), [len(row) - len(header) for row in rows[1:]]


def _readable_csv_rows(frame: pd.DataFrame, extra_fields: list[int], path: Path) -> pd.DataFrame:
    """The CSV rows with as many fields as the header that ``readable_problem`` passes, each cell read
    as a JSONL row would hold it (numbers, booleans): a row cut short by a crash, a p-value of 2 or
    a seed ``inf`` is skipped with a warning, as the ``.jsonl`` reader skips such rows."""
    records = [{c: _csv_value(c, v) for c, v in zip(frame.columns, row)} for row in frame.itertuples(index=False)]

    def problem(number: int) -> str | None:
        extra = extra_fields[number]
        if extra:
            return f"{abs(extra)} fields {'fewer' if extra < 0 else 'more'} than the header ({'a row cut short?' if extra < 0 else 'rows run together?'})"
        return readable_problem(records[number])

    keep = readable_rows(range(len(records)), path, problem)
    return frame.iloc[keep]


_MISSING_TEXT = {"nan", "na", "n/a", "<na>", "none", "null"}  # how pandas, R and spreadsheets write a missing value


def _csv_value(column: str, value: Any) -> Any:
    """A CSV cell as a JSONL row would hold it: None if empty or a missing-value word (nan, NA);
    numbers and booleans as such if they parse as the leaderboard parses them (else the text, which
    ``readable_problem`` refuses)."""
    if _missing(value) or (column not in TEXT_COLUMNS and value.strip().lower() in _MISSING_TEXT):
        return None
    if column in NUMERIC_COLUMNS:
        if not value.isascii() or "_" in value:  # float() reads "1_0" and Arabic digits, normalize's pd.to_numeric does not
            return value
        try:
            return float(value)
        except ValueError:
            return value
    if column == "detected":
        verdict = _to_bool(value)
        return value if verdict is pd.NA else verdict
    return value


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Exactly COLUMNS with fixed dtypes: floats, nullable Int64 seed, nullable boolean ``detected``, text."""
    out = frame.reindex(columns=COLUMNS)  # a copy; missing columns become NaN, extra ones are dropped
    for column in NUMERIC_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    out["seed"] = out["seed"].where(out["seed"].abs() <= MAX_SEED).round().astype("Int64")  # inf, 1e300: missing
    out["detected"] = pd.array([_to_bool(v) for v in out["detected"]], dtype="boolean")
    for column in TEXT_COLUMNS:
        out[column] = [None if _missing(v) or v == "" else str(v) for v in out[column]]  # CSV: "" == missing
        out[column] = out[column].astype(object)
    return out.reset_index(drop=True)


def write_leaderboard(frame: pd.DataFrame, out_dir: Path, name: str) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.md``, the plots under ``<name>/`` and ``<name>.html`` (a
    self-contained page with them inlined); return every path written. ``name`` must be a plain
    file name (refused otherwise): nothing is written outside ``out_dir``."""
    out_dir = Path(out_dir)
    csv_path, md_path, html_path, plots_dir = (inside(out_dir, f"{name}{suffix}") for suffix in (".csv", ".md", ".html", ""))
    check_leaderboard_out(out_dir, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = sort_rows(normalize(frame))
    escaped = table.copy()
    for column in TEXT_COLUMNS:  # formula injection: a label "=HYPERLINK(...)" stays text
        escaped[column] = [csv_cell(v) if isinstance(v, str) else v for v in escaped[column]]
    csv_text = escaped.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    _atomic_write(csv_path, csv_text)
    table = _read_table(csv_path)  # the figures as the CSV holds them (6 digits), so that every one
    groups = summarize_frame(table)  # rendered is recomputable from it; computed once, rendered three times
    _atomic_write(md_path, render_markdown(table, name, groups))
    plots = plot_leaderboard(table, plots_dir, groups)
    written = [path for paths in plots.values() for path in paths]
    _remove_stale_plots(plots_dir, written)
    _atomic_write(html_path, render_html(table, name, plots, csv_path.name, groups))
    return [csv_path, md_path, html_path, *written]


def check_leaderboard_out(out_dir: Path, name: str) -> None:
    """``write_leaderboard(..., out_dir, name)`` can write all its files (checked before a run, so
    that a grid does not end on a folder where ``<name>.html`` goes)."""
    check_entries(Path(out_dir), tuple(f"{name}{suffix}" for suffix in (".csv", ".md", ".html")), (name,))


def _remove_stale_plots(plots_dir: Path, written: list[Path]) -> None:
    """Delete the plots of an earlier rendering that this one did not write (a model or dataset
    since removed from the grid): only files named as wmbench names its plots."""
    keep = {p.name for p in written}
    for path in plots_dir.glob("*.png") if plots_dir.is_dir() else []:
        if path.name not in keep and path.name.endswith(PLOT_SUFFIXES) and path.is_file() and not path.is_symlink():
            path.unlink()


def sort_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in a deterministic order (stable sort, missing values last)."""
    return frame.sort_values(SORT_KEYS, kind="mergesort", na_position="last").reset_index(drop=True)


def render_markdown(frame: pd.DataFrame, name: str, groups: list[GroupSummary] | None = None) -> str:
    """Title and legend, then per (model, dataset) a per-method summary and one method x strength
    table per attack (``groups``: ``summarize_frame(frame)``, computed here when not given)."""
    parts = [f"# wmbench leaderboard: {md_cell(name)}", f"{md_cell(run_meta(frame))}.", LEGEND]
    for g in summarize_frame(frame) if groups is None else groups:
        metrics = joined_values(g.rows["metric"])
        parts.append(f"## {md_cell(g.model)} / {md_cell(g.dataset)} (metric: {md_cell(metrics)})")
        parts.append(_table(summary_cells(g)))
        chance = at_chance_text(g.methods, md_cell)
        if chance is not None:
            parts.append(chance)
        for attack in g.attacks:
            parts.append(f"### {md_cell(attack)}")
            parts.append(_table(attack_cells(g, attack)))
    failed = failed_cells(frame)
    if not failed.empty:
        parts += ["## Failed cells", FAILED_NOTE, _table(failed.astype(str))]
    return "\n\n".join(parts) + "\n"


def summary_cells(group: GroupSummary) -> pd.DataFrame:
    """Per method: statistic, seeds, clean error, imperceptibility, clean detection, cheap removals, train s/epoch."""
    rows = []
    for s in group.methods:
        cheap = [f"{a} ({s.removals[a].text()})" for a in s.cheap_removals]
        rows.append({
            "method": s.method,
            "statistic": statistic_label(s.statistic),
            "seeds": s.seeds_text,
            "clean error (%)": s.clean_error.text() + s.at_chance_mark,
            "imperceptibility (%)": figure_text(s.imperceptibility, s.seeds, signed=True),
            "detected clean": s.clean.detection,
            f"removed for < {CHEAP_REMOVAL_POINTS:g} pts by": "; ".join(cheap) or ("none" if s.seeds and s.clean.known else NA),  # no clean verdict: nothing to remove
            "train s/epoch": figure_text(s.train_s, s.seeds),
        })
    return pd.DataFrame(rows)


def attack_cells(group: GroupSummary, attack: str) -> pd.DataFrame:
    """A row per method and strength (``clean`` first): the seeds its figures rest on, error,
    error_delta, statistic, log10 p, detection."""
    rows = [{
        "method": method,
        "strength": "clean" if strength is None else f"{strength:g}",
        "seeds": c.seeds_text,
        "error (%)": figure_text(c.error, c.seeds),
        "error_delta": figure_text(c.delta, c.seeds, signed=True),
        "detect_stat": figure_text(c.stat, c.seeds, 3),
        "log10 p": figure_text(c.log10_p, c.seeds, 1),
        "detected": c.detection,
    } for method, strength, c in group.cells[attack]]
    return pd.DataFrame(rows, columns=["method", "strength", "seeds", "error (%)", "error_delta", "detect_stat", "log10 p", "detected"])


def _table(frame: pd.DataFrame) -> str:
    """A pipe table; every cell escaped (a label with ``|`` or a newline cannot break the table)."""
    cells = [[md_cell(v) for v in row] for row in frame.itertuples(index=False)]
    return tabulate(cells, headers=[md_cell(c) for c in frame.columns], tablefmt="pipe", disable_numparse=True)


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The last readable row of each cell: rows holding every required column (others: torn lines,
    foreign JSON, are skipped); rows of the wrong types are skipped with a warning
    (``readable_rows``) before the last row per cell_id wins, so one cannot hide a good earlier row."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                continue  # blank, or cut short by a crash
            if isinstance(row, dict) and all(c in row for c in REQUIRED_COLUMNS):
                rows.append(row)
    cells: dict[Any, dict[str, Any]] = {}
    for number, row in enumerate(readable_rows(rows, path)):
        cell_id = row.pop("cell_id", None)
        cells[cell_id if isinstance(cell_id, str) else ("row", number)] = row
    return list(cells.values())


def _to_bool(value: Any) -> Any:
    if _missing(value):
        return pd.NA
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else pd.NA


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            os.fchmod(fh.fileno(), 0o644)  # mkstemp makes 0600; published files are world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
