"""Paired difference of two accuracy-time curves at their last epoch: treatment minus control, seed
by seed, with a 95% t interval over the seeds both curves have.

    python leaderboard/paired_curves.py TREATMENT_curve.csv CONTROL_curve.csv [MORE_CONTROL_curve.csv ...]

(several control files: their seeds together, as when one seed's control ran in another file; a
seed measured in two of them is refused.)

Prints one line per accuracy column (plain and each test-time-augmented one both curves measured):
the per-seed differences in points and their mean with its interval. This is how the comparisons
of recipes in leaderboard/README.md are recomputed from the published curves."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from wmbench.statistics import mean_interval

COLUMNS = ["metric_value", "metric_value_flip", "metric_value_flip_translate"]


def last_epoch(*paths: Path) -> pd.DataFrame:
    """The curves' rows at their last epoch, indexed by (model, dataset, seed)."""
    frames = [pd.read_csv(path) for path in paths]
    frame = pd.concat([f[f.epoch == f.epochs] for f in frames]).set_index(["model", "dataset", "seed"])
    if frame.index.duplicated().any():
        model, dataset, seed = frame.index[frame.index.duplicated()][0]
        raise SystemExit(f"{model}/{dataset} seed {seed} is measured twice in {', '.join(map(str, paths))}")
    return frame


def paired_lines(treatment: pd.DataFrame, control: pd.DataFrame) -> list[str]:
    """One line per accuracy column measured in both: per-seed differences and their mean interval."""
    lines = []
    for (model, dataset), _ in treatment.groupby(level=["model", "dataset"]):
        if (model, dataset) not in control.droplevel("seed").index:
            continue
        t, c = treatment.loc[(model, dataset)], control.loc[(model, dataset)]
        seeds = sorted(set(t.index) & set(c.index))
        for column in COLUMNS:
            if column not in t or column not in c or t.loc[seeds, column].isna().any() or c.loc[seeds, column].isna().any():
                continue
            diffs = [100 * (t.loc[s, column] - c.loc[s, column]) for s in seeds]
            per_seed = ", ".join(f"seed {s}: {d:+.2f}" for s, d in zip(seeds, diffs))
            lines.append(f"{model}/{dataset} {column}: {mean_interval(diffs).text(signed=True)} points over {len(seeds)} seeds ({per_seed})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("treatment", type=Path)
    parser.add_argument("control", type=Path, nargs="+")
    args = parser.parse_args()
    lines = paired_lines(last_epoch(args.treatment), last_epoch(*args.control))
    print("\n".join(lines) if lines else "no (model, dataset, seed) in both curves at their last epoch")


if __name__ == "__main__":
    main()
