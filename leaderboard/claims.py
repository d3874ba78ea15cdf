"""Recompute every figure that leaderboard/README.md cites from a published CSV.

    python leaderboard/claims.py leaderboard/quickstart.csv
    python leaderboard/claims.py leaderboard/quickstart_null.csv       (a calibrated null)
    python leaderboard/claims.py leaderboard/cifar10_speednet_recipe_curve.csv   (a curve)

Prints, per method: clean error and imperceptibility (mean and 95% t interval over seeds), the
training seconds per epoch and peak memory (and the run's total evaluation and attack seconds),
then per attack and strength: error_delta (mean and interval), the mean detection statistic and
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
    print("\n# cost: training seconds per epoch, mean [min, max] over seeds; peak memory (MB), mean")
    for (model, dataset, method), g in clean.groupby(["model", "dataset", "method"]):
        t = g["train_s_per_epoch"].dropna()
        if not t.empty:
            print(f"{model}/{dataset} {method}: {t.mean():.2f} [{t.min():.2f}, {t.max():.2f}] s/epoch; "
                  f"peak {g['peak_mem_mb'].mean():.0f} MB")
    print(f"all rows: {frame['eval_s'].sum():.0f} s of evaluation, {frame['attack_s'].sum():.0f} s of attacks")
    print("\n# attacks: error_delta (points), mean statistic, detection")
    attacked = frame[frame["strength"] > 0]
    for (model, dataset, attack, strength, method), g in attacked.groupby(["model", "dataset", "attack", "strength", "method"]):
        print(f"{model}/{dataset} {attack} {strength:g} {method}: delta {mean_interval(g['error_delta'])}; "
              f"stat {g['detect_stat'].mean():.2f}; detected {detection(g['detected'])}")


def null_claims(path: str) -> None:
    """Per method, over every row of a ``wmbench null`` CSV: false positives at the threshold (k/n,
    Wilson) and the share of null p-values below 0.01; then the rows where the TPR at 1% FPR and
    at the threshold differ."""
    frame = pd.read_csv(path)
    frame = frame[frame["null_n"] > 0]
    total = frame["null_n"].sum()
    print(f"# null draws: {total}, false positives at the threshold: {frame['null_fp'].sum()} "
          f"(Wilson 95% upper {wilson_interval(int(frame['null_fp'].sum()), int(total)).high:.4%})")
    for method, g in frame.groupby("method"):
        n, k = int(g["null_n"].sum()), int(g["null_fp"].sum())
        below = (g["fpr_p01"] * g["null_n"]).round().sum() / n
        print(f"{method}: FP {k}/{n} (upper {wilson_interval(k, n).high:.3%}); p<0.01 share {below:.2%}; "
              f"clean TPR@1%FPR {g.loc[g['attack'] == 'clean', 'tpr_fpr1'].tolist()}")
    differ = frame[frame["tpr_fpr1"].round(6) != frame["tpr_threshold"].round(6)].dropna(subset=["tpr_fpr1"])
    for r in differ.itertuples():
        print(f"{r.method} {r.attack} {r.strength:g}: TPR {r.tpr_threshold:.3f} at the threshold, {r.tpr_fpr1:.3f} at 1% FPR")


def curve_claims(path: str) -> None:
    """Per model and epoch of a ``wmbench curve`` CSV: mean training minutes, accuracy (t interval)."""
    frame = pd.read_csv(path)
    for (model, epoch), g in frame.groupby(["model", "epoch"]):
        print(f"{model} epoch {epoch}: {g['train_minutes'].mean():.2f} min; "
              f"accuracy {mean_interval(100 * g['metric_value'])} ({len(g)} seeds)")


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "leaderboard/quickstart.csv"
    if target.endswith("_null.csv"):
        null_claims(target)
    elif target.endswith("_curve.csv"):
        curve_claims(target)
    else:
        main(target)
