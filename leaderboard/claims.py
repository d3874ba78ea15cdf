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
from pathlib import Path

import pandas as pd

from wmbench.cli import reported
from wmbench.curve import TTA_COLUMNS
from wmbench.errors import WmbenchError
from wmbench.leaderboard import read_results
from wmbench.statistics import DELTA_RANGE, PERCENT_RANGE, mean_interval, share_text


def detection(detected: pd.Series) -> str:
    """k/n over seeds of ``detected`` (indexed by seed): a seed with several rows counts as detected
    when all its verdicts are, as the leaderboard counts it; seeds without a verdict are left out."""
    known = detected.dropna().astype(bool).groupby(level=0).all()
    if known.empty:
        return "n/a (not applicable)"
    return share_text(int(known.sum()), len(known))


def read_table(path: str, what: str, numbers: list[str], texts: list[str]) -> pd.DataFrame:
    """The CSV at ``path`` (a ``wmbench null`` or ``curve`` one, ``what``) with its ``numbers``
    columns as floats (empty cells missing) and its ``texts`` columns present; a WmbenchError naming
    the file where it cannot be read, lacks one of them or holds a value that is no number."""
    if not Path(path).is_file():
        raise WmbenchError(f"{path}: {'not a regular file' if Path(path).exists() else 'no such file'}")
    try:
        frame = pd.read_csv(path, encoding="utf-8")
    except UnicodeDecodeError:
        raise WmbenchError(f"{path}: not a {what} CSV (not UTF-8 text)") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise WmbenchError(f"{path}: not a {what} CSV ({' '.join(str(exc).split())[:200] or 'empty'})") from None
    missing = [c for c in texts + numbers if c not in frame.columns]
    if missing:
        raise WmbenchError(f"{path}: not a {what} CSV (no column {', '.join(missing[:3])})")
    for column in numbers:
        parsed = pd.to_numeric(frame[column], errors="coerce")
        wrong = frame[column].notna() & parsed.isna()
        if wrong.any():
            raise WmbenchError(f"{path}: {column} {frame.loc[wrong, column].iloc[0]!r} (row {wrong.idxmax() + 2}) is not a number")
        frame[column] = parsed.astype(float)
    return frame


def seed_means(g: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` averaged per seed: two rows of one seed are one sample, as in the leaderboard."""
    return g.groupby("seed")[columns].mean()


def main(path: str) -> None:
    frame = read_results(path)
    frame = frame[frame["failure"].isna()]
    clean = frame[frame["strength"] == 0]
    print("# clean models: error (%), imperceptibility (points), detection")
    for (model, dataset, method), g in clean.groupby(["model", "dataset", "method"]):
        seeds = seed_means(g.assign(imp=g["error_clean"] - g["error_unwatermarked"]), ["error_clean", "imp"])
        print(f"{model}/{dataset} {method}: error {mean_interval(seeds['error_clean'], bounds=PERCENT_RANGE)}; "
              f"imperceptibility {mean_interval(seeds['imp'], bounds=DELTA_RANGE)}; detected {detection(g.set_index('seed')['detected'])}")
    print("\n# cost: training seconds per epoch, mean [min, max] over seeds; peak memory (MB), mean")
    for (model, dataset, method), g in clean.groupby(["model", "dataset", "method"]):
        t = seed_means(g, ["train_s_per_epoch"])["train_s_per_epoch"].dropna()
        if not t.empty:
            print(f"{model}/{dataset} {method}: {t.mean():.2f} [{t.min():.2f}, {t.max():.2f}] s/epoch; "
                  f"peak {g['peak_mem_mb'].mean():.0f} MB")
    print(f"all rows: {frame['eval_s'].sum():.0f} s of evaluation, {frame['attack_s'].sum():.0f} s of attacks")
    print("\n# attacks: error_delta (points), mean statistic, detection")
    attacked = frame[frame["strength"] > 0]
    for (model, dataset, attack, strength, method), g in attacked.groupby(["model", "dataset", "attack", "strength", "method"]):
        seeds = seed_means(g, ["error_delta", "detect_stat"])
        print(f"{model}/{dataset} {attack} {strength:g} {method}: delta {mean_interval(seeds['error_delta'], bounds=DELTA_RANGE)}; "
              f"stat {seeds['detect_stat'].mean():.2f}; detected {detection(g.set_index('seed')['detected'])}")


def null_claims(path: str) -> None:
    """Per method of a ``wmbench null`` CSV: its draws per row, false positives at the threshold and
    null p-values below 0.01 (k/n with a Wilson interval: for the clean row, and the range over
    rows); then the rows where the TPR at 1% FPR and at the threshold differ. Every row of a method
    reuses the same draws (its keys on the same unwatermarked models, clean and after each attack),
    so rows are not independent samples and are never pooled into one k/n."""
    frame = read_table(path, "wmbench null", ["strength", "null_n", "null_fp", "fpr_p01", "tpr_fpr1", "tpr_threshold"], ["method", "attack"])
    frame = frame[frame["null_n"] > 0]
    no_clean = sorted(set(frame["method"]) - set(frame.loc[frame["attack"] == "clean", "method"]), key=str)
    if no_clean:
        raise WmbenchError(f"{path}: no clean row (attack 'clean' with draws) for method {no_clean[0]!r}")
    print(f"# {len(frame)} rows; each method's rows reuse its draws: every bound is over one row's draws")
    for method, g in frame.groupby("method"):
        below = (g["fpr_p01"] * g["null_n"]).round().astype(int)
        clean = g[g["attack"] == "clean"].iloc[0]
        n, clean_below = int(clean["null_n"]), int(round(clean["fpr_p01"] * clean["null_n"]))
        print(f"{method}: {len(g)} rows of {n} draws; false positives at the threshold: clean {share_text(int(clean['null_fp']), n)}, "
              f"at most {int(g['null_fp'].max())} in a row; p<0.01: clean {share_text(clean_below, n)}, "
              f"{below.min()} to {below.max()} per row; clean TPR@1%FPR {clean['tpr_fpr1']}")
    differ = frame[frame["tpr_fpr1"].round(6) != frame["tpr_threshold"].round(6)].dropna(subset=["tpr_fpr1"])
    for r in differ.itertuples():
        print(f"{r.method} {r.attack} {r.strength:g}: TPR {r.tpr_threshold:.3f} at the threshold, {r.tpr_fpr1:.3f} at 1% FPR")


def curve_claims(path: str) -> None:
    """Per model and epoch of a ``wmbench curve`` CSV: mean training minutes, accuracy (t interval),
    and the test-time-augmented accuracies the curve measured. Paired differences between two
    curves are printed by ``leaderboard/paired_curves.py``."""
    frame = read_table(path, "wmbench curve", ["epoch", "train_minutes", "metric_value"], ["model"])
    tta = [c for c in TTA_COLUMNS if c in frame and frame[c].notna().any()]
    for (model, epoch), g in frame.groupby(["model", "epoch"]):
        extra = "".join(f"; {TTA_COLUMNS[c]} {mean_interval(100 * g[c], bounds=PERCENT_RANGE)}" for c in tta if g[c].notna().all())
        print(f"{model} epoch {epoch:g}: {g['train_minutes'].mean():.2f} min; "
              f"accuracy {mean_interval(100 * g['metric_value'], bounds=PERCENT_RANGE)}{extra} ({len(g)} seeds)")


def claims(target: str) -> int:
    """Print the claims of the CSV ``target`` (a null's, a curve's or a leaderboard's)."""
    if target.endswith("_null.csv"):
        null_claims(target)
    elif target.endswith("_curve.csv"):
        curve_claims(target)
    else:
        main(target)
    return 0


def run(argv: list[str]) -> int:
    """Print the claims of the CSV ``argv[0]`` names (the quickstart's by default); a file that
    cannot be read is one line and exit 2, a fault of the machine exit 4, as ``wmbench`` says them."""
    target = argv[0] if argv else "leaderboard/quickstart.csv"
    return reported("claims.py", lambda: claims(target))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
