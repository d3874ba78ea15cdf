"""How many training epochs a scenario can afford in the seconds a device call has left.

Usage: python scripts/size_gpu_epochs.py SCENARIO PROBE_STORE SECONDS [--set K=V ...]
       python scripts/size_gpu_epochs.py SCENARIO --measured RESULTS SECONDS [--set K=V ...]

PROBE_STORE is the results store of a short training of the scenario's unwatermarked model on the
same data and device (the call's own measurement, CUDA warm-up included, so it errs long: on
2026-12-04 the estimate, 322 s, was about a third above what the run took): its rows give the
seconds per plain epoch and per evaluation. The grid's cost at E epochs is

    sum over trainings of (ratio(method) x E + extra(method)) x epoch_s
        + evaluations x eval_s + trainings x PER_TRAINING_S
        + fine-tuning attacks (data_fraction x epochs each) x epoch_s,

with each method's step cost relative to a plain step (README "Performance", H200, the highest
ratio measured). With ``--measured RESULTS`` (a published CSV or a store of an earlier run of the
same scenario on the same kind of device, e.g. leaderboard/paper_gpu_e2.csv) the probe is not
needed: each method label's seconds per epoch is the highest that run measured, and evaluation
and attack seconds are its means, so the estimate errs long only by that run's warm-up share:

    sum over trainings of epoch_s(label) x E + evaluations x (eval_s + attack_s)
        + trainings x PER_TRAINING_S.

The rule, written down before any GPU run: the largest E whose cost is at most SAFETY x SECONDS
(SAFETY_MEASURED x SECONDS with --measured), at least 1; printed on stdout (the reasoning on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

from wmbench.api import Method
from wmbench.grid import TrainCell, expand
from wmbench.leaderboard import read_results
from wmbench.scenario import load_scenario

SAFETY = 0.8  # a fifth of the time left unplanned: the estimate's ratios come from other runs
SAFETY_MEASURED = 0.9  # --measured: this scenario's own figures on this kind of device (written 2026-12-04, before its first use)
PER_TRAINING_S = 3.0  # model build, key generation, first-step warm-up, detection
STEP_RATIO = {  # a method's training step over a plain step (README "Performance", H200; highest run)
    "none": 1.0, "watermas": 2.31, "uchida": 1.10, "tartaglione": 2.86, "li_sign": 1.20, "hufunet": 1.10,
}
UNKNOWN_RATIO = 3.0  # a method without a measured ratio: assumed dear


def method_cost(method: Method, epochs: int) -> float:
    """Plain-epoch units for one training of ``method`` at ``epochs`` epochs."""
    if method.name == "watermas" and getattr(method, "lam", None) == 0.0:
        return epochs  # the frozen-carrier control takes a plain step
    extra = 0.0  # Li's fine-tuning comes out of the epochs ("shared") unless its budget is "extra"
    if getattr(method, "finetune_budget", None) == "extra":
        extra = STEP_RATIO["li_sign"] * method.finetune_epochs
    return STEP_RATIO.get(method.name, UNKNOWN_RATIO) * epochs + extra


def probe_cost(probe_store: str, cells: list[TrainCell], evaluations: int) -> Callable[[int], float] | None:
    """The grid's estimated seconds at E epochs from a probe of plain training, or None (said why) without one."""
    rows = [json.loads(line) for line in open(probe_store) if line.strip()]
    attacked = [r for r in rows if r.get("eval_s") and r.get("train_s_per_epoch")]
    if not attacked:
        print("size_gpu_epochs: the probe store has no row with train_s_per_epoch and eval_s", file=sys.stderr)
        return None
    epoch_s = max(r["train_s_per_epoch"] for r in attacked)
    eval_s = max(r["eval_s"] for r in attacked)
    finetune = sum(
        max(1, round(a.strength)) * a.attack.data_fraction for c in cells for a in c.attacks if a.attack.name == "finetune"
    )
    print(f"size_gpu_epochs: probe: {epoch_s:.2f} s per plain epoch, {eval_s:.2f} s per evaluation", file=sys.stderr)
    return lambda epochs: (
        (sum(method_cost(c.method.obj, epochs) for c in cells) + finetune) * epoch_s
        + evaluations * eval_s + len(cells) * PER_TRAINING_S
    )


def measured_cost(results: str, cells: list[TrainCell], evaluations: int) -> Callable[[int], float] | None:
    """The grid's estimated seconds at E epochs from an earlier run's rows, or None (said why) if it lacks a label."""
    frame = read_results(Path(results))
    epoch_s = frame.groupby("method")["train_s_per_epoch"].max()
    missing = sorted({c.method.label for c in cells} - set(epoch_s.dropna().index))
    if missing:
        print(f"size_gpu_epochs: {results} has no seconds per epoch for {', '.join(missing)}", file=sys.stderr)
        return None
    per_evaluation = float(frame["eval_s"].mean() + frame["attack_s"].mean())
    print(f"size_gpu_epochs: measured in {results}: {per_evaluation:.3f} s per evaluation with its attack", file=sys.stderr)
    return lambda epochs: (
        sum(float(epoch_s[c.method.label]) for c in cells) * epochs + evaluations * per_evaluation + len(cells) * PER_TRAINING_S
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("probe_store", nargs="?", help="results store of a short plain training (not with --measured)")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--measured", metavar="RESULTS", help="a CSV or store of an earlier run of the scenario on this kind of device")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    if (args.probe_store is None) == (args.measured is None):
        parser.error("give either PROBE_STORE or --measured RESULTS")
    cells = expand(load_scenario(args.scenario, args.set))
    evaluations = sum(len(c.attacks) for c in cells)
    cost = measured_cost(args.measured, cells, evaluations) if args.measured else probe_cost(args.probe_store, cells, evaluations)
    if cost is None:
        return 1
    safety = SAFETY_MEASURED if args.measured else SAFETY
    epochs = 1
    while cost(epochs + 1) <= safety * args.seconds and epochs < 200:
        epochs += 1
    print(
        f"size_gpu_epochs: {len(cells)} trainings, {evaluations} evaluations; {epochs} epochs "
        f"cost about {cost(epochs):.0f} s of {args.seconds:.0f} s (rule: at most {safety:.0%}); "
        f"{epochs + 1} would cost {cost(epochs + 1):.0f} s",
        file=sys.stderr,
    )
    print(epochs)
    return 0 if math.isfinite(cost(epochs)) else 1


if __name__ == "__main__":
    sys.exit(main())
