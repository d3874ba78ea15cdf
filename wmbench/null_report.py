"""The null's table: empirical FPR at the threshold (Wilson interval) and TPR at fixed empirical FPR,
written as ``<name>_null.csv`` and ``<name>_null.md``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tabulate import tabulate

from wmbench.names import check_entries, md_cell
from wmbench.null import CLEAN, FPR_LEVELS, NullSample, SampleKey, null_cutoff, statistic_falls_with_evidence, true_positive_rate
from wmbench.results import readable_rows
from wmbench.statistics import share_text, wilson_interval

NULL_COLUMNS = [
    "scenario", "model", "dataset", "method", "attack", "strength", "threshold",
    "null_n", "null_fp", "fpr", "fpr_low", "fpr_high", "fpr_p01", "null_skipped",
    "cutoff_fpr1", "cutoff_fpr01", "wm_n", "tpr_threshold", "tpr_fpr1", "tpr_fpr01", "note",
    "device", "torch_threads",
]


# Parts of a row's ``note`` (joined by "; ", in this order): the failed draws' part is read back
# from it by ``failed_draws`` for the Markdown (the CSV alone renders it).
FAILED_DRAWS = "draws failed"
NONFINITE_DRAWS = "draws on attacked models holding non-finite values"
NO_WATERMARKED = "no watermarked rows in the results store (run the scenario first)"
REVERSED_NOTE = ("the statistic falls as the evidence grows (its p-values rise with it): no empirical cutoff, which takes "
                 "larger as more likely watermarked (Method.statistic's contract; report e.g. 1 - a bit-error rate)")
# "<k> draws failed (<the first's reason>)", up to a later part of the note or its end: the reason
# (a failure message) may hold parentheses and "; " of its own.
_FAILED_PART = re.compile(
    rf"(?:^|; )(\d+) {FAILED_DRAWS} \((.*?)\)(?=$|; \d+ {re.escape(NONFINITE_DRAWS)} \(|; {re.escape(NO_WATERMARKED)}$)", re.S
)

Scores = list[tuple[float | None, float | None]]  # (detect_stat, detect_pvalue) of watermarked rows


def watermarked_stats(rows: Iterable[dict[str, Any]], scenario: str, source: object = "the results store") -> dict[SampleKey, Scores]:
    """The watermarked rows' (``detect_stat``, ``detect_pvalue``) per (model, dataset, method, attack, strength); strength 0
    rows (the clean model, repeated under every attack) are counted once per seed under ``clean``.
    Rows of the wrong types are skipped with a warning naming ``source`` (``readable_rows``)."""
    out: dict[SampleKey, Scores] = {}
    seen_clean: set[tuple[Any, ...]] = set()
    for r in readable_rows((r for r in rows if r.get("scenario") == scenario), source):
        strength = float(r["strength"])
        attack = r["attack"]
        if strength == 0:
            ident = (r["model"], r["dataset"], r["method"], r["seed"])
            if ident in seen_clean:
                continue
            seen_clean.add(ident)
            attack = CLEAN
        stat, pvalue = r.get("detect_stat"), r.get("detect_pvalue")
        scores = (None if stat is None else float(stat), None if pvalue is None else float(pvalue))
        out.setdefault((r["model"], r["dataset"], r["method"], attack, strength), []).append(scores)
    return out


def null_table(samples: dict[SampleKey, NullSample], watermarked: dict[SampleKey, Scores], scenario: str, threshold: float,
               device: str, threads: int) -> pd.DataFrame:
    """One row per (model, dataset, method, attack, strength) of the null; ``device`` (its label)
    and ``threads`` are what the draws were computed with, as a result row records them."""
    rows = []
    for (model, dataset, method, attack, strength), s in samples.items():
        n = len(s.pvalues)
        fp = sum(p < threshold for p in s.pvalues)
        ci = wilson_interval(fp, n)
        wm_scores = watermarked.get((model, dataset, method, attack, strength), [])
        wm = [stat for stat, _ in wm_scores]
        notes = []
        if statistic_falls_with_evidence([*zip(s.stats, s.pvalues), *((st, p) for st, p in wm_scores if st is not None and p is not None)]):
            cut1 = cut01 = None  # a cutoff above the null's quantile would count the marked models as misses
            notes.append(REVERSED_NOTE)
        else:
            cut1, cut01 = (null_cutoff(s.stats, level) for level in FPR_LEVELS)
            for level, cut in zip(FPR_LEVELS, (cut1, cut01)):
                if n and cut is None:
                    notes.append(f"{100 * level:g}% FPR needs >= {round(1 / level)} null draws, has {n}")
        if s.skipped:
            notes.append(f"{s.skipped} draws not applicable")
        if s.failed:
            notes.append(f"{s.failed} {FAILED_DRAWS} ({s.failure})")
        if s.nonfinite:
            notes.append(f"{s.nonfinite} {NONFINITE_DRAWS} (first in {s.nonfinite_in})")
        if not wm:
            notes.append(NO_WATERMARKED)
        rows.append({
            "scenario": scenario, "model": model, "dataset": dataset, "method": method, "attack": attack,
            "strength": strength, "threshold": threshold, "null_n": n, "null_fp": fp,
            "fpr": ci.estimate, "fpr_low": ci.low, "fpr_high": ci.high,
            "fpr_p01": (sum(p < 0.01 for p in s.pvalues) / n) if n else math.nan,
            "null_skipped": s.skipped, "cutoff_fpr1": cut1, "cutoff_fpr01": cut01, "wm_n": len(wm),
            "tpr_threshold": (sum(p is not None and p < threshold for _, p in wm_scores) / len(wm)) if wm else None,
            "tpr_fpr1": true_positive_rate(wm, cut1), "tpr_fpr01": true_positive_rate(wm, cut01),
            "note": "; ".join(notes), "device": device, "torch_threads": threads,
        })
    return pd.DataFrame(rows, columns=NULL_COLUMNS)


def _share(value: Any, n: Any) -> str:
    """A share of ``n`` as k/n with its Wilson interval; n/a when not measured."""
    if value is None or n is None or (isinstance(value, float) and math.isnan(value)) or not n > 0:
        return "n/a"
    return share_text(int(round(value * n)), int(n))


def failed_draws(note: Any) -> tuple[int, str] | None:
    """(how many draws failed, the first one's reason) from a row's ``note``; None when none failed."""
    match = _FAILED_PART.search(note) if isinstance(note, str) else None
    return (int(match.group(1)), match.group(2)) if match else None


def _failed_section(frame: pd.DataFrame) -> list[str]:
    """The Markdown lines saying which rows' draws failed and why (the first reason of each, as the
    CSV's note gives it); none when no draw failed."""
    table = []
    for r in frame.itertuples():
        failed = failed_draws(r.note)
        if failed:
            table.append([md_cell(r.model), md_cell(r.dataset), md_cell(r.method), md_cell(r.attack), f"{r.strength:g}", failed[0], md_cell(failed[1])])
    if not table:
        return []
    return [
        "## Failed draws",
        "",
        "Draws that could not be made (an attack or a detector raised): they are in no share above. Per row, "
        "how many and the first one's reason (`attack:` or `detect:`, the stage that failed).",
        "",
        tabulate(table, headers=["model", "dataset", "method", "attack", "strength", "failed", "reason"], tablefmt="github", disable_numparse=True),
        "",
    ]


def null_markdown(frame: pd.DataFrame, name: str, keys: int, seeds: list[int]) -> str:
    """The null as Markdown: per model/dataset, one row per method, attack and strength."""
    lines = [
        f"# {md_cell(name)}: calibrated null",
        "",
        f"{keys} independent key{'s' if keys != 1 else ''} per method on each of {len(seeds)} unwatermarked models (the `none` "
        f"trainings, seeds {', '.join(map(str, seeds))}), clean and after each attack; every row of a method "
        "reuses the same draws, so rows are not independent samples. Each share is k/n with its 95% Wilson "
        "interval (rounded outwards). FPR: null draws with p-value below the scenario's threshold; "
        "p<0.01: null draws below 0.01 (a calibrated p-value gives about 1%). TPR @ x% FPR: the "
        "watermarked rows (results store, all seeds) whose statistic exceeds the null's (1 - x) "
        "quantile (a missing statistic is a miss); n/a when the null has fewer than 1/x draws.",
        "",
    ]
    for (model, dataset), part in frame.groupby(["model", "dataset"], sort=False):
        lines += [f"## {md_cell(model)} / {md_cell(dataset)}", ""]
        table = [
            [
                md_cell(r.method), md_cell(r.attack), f"{r.strength:g}",
                share_text(int(r.null_fp), int(r.null_n)), _share(r.fpr_p01, r.null_n),
                _share(r.tpr_threshold, r.wm_n), _share(r.tpr_fpr1, r.wm_n), _share(r.tpr_fpr01, r.wm_n), int(r.wm_n),
            ]
            for r in part.itertuples()
        ]
        headers = ["method", "attack", "strength", f"FPR @ p<{part.threshold.iloc[0]:g}", "p<0.01", "TPR @ threshold", "TPR @1% FPR", "TPR @0.1% FPR", "wm rows"]
        lines += [tabulate(table, headers=headers, tablefmt="github"), ""]
        reversed_methods = sorted({r.method for r in part.itertuples() if isinstance(r.note, str) and REVERSED_NOTE in r.note})
        if reversed_methods:
            lines += [f"No TPR at an empirical FPR for {', '.join(md_cell(m) for m in reversed_methods)}: {REVERSED_NOTE}.", ""]
    lines += _failed_section(frame)
    return "\n".join(lines)


def write_null(frame: pd.DataFrame, out: Path, name: str, keys: int, seeds: list[int]) -> list[Path]:
    """``<out>/<name>_null.csv`` and ``<out>/<name>_null.md``."""
    check_entries(out, (f"{name}_null.csv", f"{name}_null.md"))
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}_null.csv", out / f"{name}_null.md"
    frame.to_csv(csv, index=False, float_format="%.6g")
    md.write_text(null_markdown(frame, name, keys, seeds) + "\n", encoding="utf-8")
    return [csv, md]
