"""Recompute every figure that leaderboard/README.md cites from a published CSV.

    python leaderboard/claims.py leaderboard/quickstart.csv

Prints, per method: clean error and imperceptibility (mean and 95% t interval over seeds), then
per attack and strength: error_delta (mean and interval), the mean detection statistic and
detection as k/n with its Wilson interval. Every number in the README's quickstart sections is
one of these lines.
"""

from __future__ import annotations

import sys

import pandas as pd

from wmbench.leaderboard import read_results
from wmbench.statistics import mean_interval, wilson_interval


def detection(detected: pd.Series) -> str:
    known = detected.dropna().astype(bool)
    if known.empty:
        return "n/a (not applicable)"
    w = wilson_interval(int(known.sum()), len(known))
    return f"{int(known.sum())}/{len(known)} [{w.low:.0%}, {w.high:.0%}]"


def main(path: str) -> None:
    frame = read_results(path)
    frame = frame[frame["failure"].isna()]
    clean = frame[frame["strength"] == 0].drop_duplicates(["model", "dataset", "method", "seed"])
    print("# clean models: error (%), imperceptibility (points), detection")
    for (model, dataset, method), g in clean.groupby(["model", "dataset", "method"]):
        imp = g["error_clean"] - g["error_unwatermarked"]
        print(f"{model}/{dataset} {method}: error {mean_interval(g['error_clean'])}; "
              f"imperceptibility {mean_interval(imp)}; detected {detection(g['detected'])}")
    print("\n# attacks: error_delta (points), mean statistic, detection")
    attacked = frame[frame["strength"] > 0]
    for (model, dataset, attack, strength, method), g in attacked.groupby(["model", "dataset", "attack", "strength", "method"]):
        print(f"{model}/{dataset} {attack} {strength:g} {method}: delta {mean_interval(g['error_delta'])}; "
              f"stat {g['detect_stat'].mean():.2f}; detected {detection(g['detected'])}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "leaderboard/quickstart.csv")
