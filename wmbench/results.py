"""The results store: one JSON line per finished cell, appended atomically; read back as a table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

# The result row, in CSV order.
COLUMNS = [
    "scenario", "model", "dataset", "method", "seed", "attack", "strength", "metric", "metric_value",
    "error", "error_clean", "error_delta", "error_unwatermarked", "detect_stat", "detect_pvalue",
    "detected", "train_s_per_epoch", "attack_s", "eval_s", "wmbench_version",
    "attack_effect", "detect_note", "peak_mem_mb", "detect_log10_p", "torch_threads", "device", "failure",
]
TIMING_COLUMNS = ["train_s_per_epoch", "attack_s", "eval_s"]
# Columns that legitimately differ between two runs of the same grid (compare results without them).
NONDETERMINISTIC_COLUMNS = [*TIMING_COLUMNS, "peak_mem_mb"]
# Measured, so they differ between two runs of the same scenario; every other column is reproducible.
MEASURED_COLUMNS = [*TIMING_COLUMNS, "peak_mem_mb"]


class ResultStore:
    """Append-only JSONL file of rows keyed by ``cell_id``; a torn last line (crash) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> dict[str, dict[str, Any]]:
        """cell_id -> row, for every complete line."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(row, dict) and isinstance(row.get("cell_id"), str):
                    out[row["cell_id"]] = row
        return out

    def append(self, cell_id: str, row: dict[str, Any]) -> None:
        """Write one row with a single write() and fsync, so it is either whole or absent."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"cell_id": cell_id, **row}, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not _ends_with_newline(fd):
                line = "\n" + line  # seal a torn line left by a crash
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def _ends_with_newline(fd: int) -> bool:
    return os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n"


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly the CSV columns, in order."""
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[COLUMNS]
