"""Recompute the p-values of a published leaderboard's z-score rows (HufuNet's) with the detector of
``detect_version`` 2, from the z each row stores, and re-render the leaderboard in place.

    python leaderboard/rederive_z_pvalues.py leaderboard/quickstart.csv [--null-draws 200]

Until 2026-12-05 HufuNet's p-value was the normal tail 1 - Phi(z), which ignores that the null's
mean and standard deviation are estimated from ``null_encoders`` draws; it is now the predictive
Student-t tail (``wmbench.metrics.z_score_pvalue``). p is a function of z and the number of null
draws alone, so the published rows are brought to the current detector without re-running them
(z as the CSV holds it, 6 significant digits: log10 p within about 1e-3 of a fresh run's). Rows
with another statistic are left as they are; ``detected`` is judged again from the new p-value at
the default threshold. Prints how many rows changed and every verdict that flipped.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from wmbench.leaderboard import read_results, write_leaderboard
from wmbench.metrics import z_score_pvalue
from wmbench.summary import DEFAULT_THRESHOLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--null-draws", type=int, default=200, help="the scenario's null_encoders (HufuNet's default: 200)")
    args = parser.parse_args()
    frame = read_results(args.csv)
    rows = frame.index[(frame["statistic"] == "z_score") & frame["detect_stat"].map(math.isfinite)]
    flipped = 0
    for i in rows:
        p, log10_p = z_score_pvalue(float(frame.at[i, "detect_stat"]), args.null_draws)
        frame.at[i, "detect_pvalue"], frame.at[i, "detect_log10_p"] = p, log10_p
        if not pd.isna(frame.at[i, "detected"]):
            verdict = p < DEFAULT_THRESHOLD
            if bool(frame.at[i, "detected"]) != verdict:
                flipped += 1
                print("flipped:", frame.loc[i, ["method", "seed", "attack", "strength", "detect_stat"]].to_dict(), "->", verdict)
            frame.at[i, "detected"] = verdict
    write_leaderboard(frame, args.csv.parent, args.csv.stem)
    print(f"{args.csv}: {len(rows)} z-score rows recomputed, {flipped} verdicts flipped")


if __name__ == "__main__":
    main()
