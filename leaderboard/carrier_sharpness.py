"""How sharp is the loss at each model's carriers? The mean rise of the test loss when every carrier
of the key moves by ``amount`` x its tensor's std (8 Gaussian draws), per trained model of a
scenario: what WaterMAS's MAS step promises to raise (tests/test_watermas.py checks it on one seed).

    wmbench run scenarios/watermas_mas_every.yaml          # the trainings, into the cache
    python leaderboard/carrier_sharpness.py scenarios/watermas_mas_every.yaml \
        --out leaderboard/watermas_mas_every_sharpness.csv

With ``--trace``, each training is run again (as the worker runs it: same seeds, same key) and
measured after every epoch, with the test accuracy: when does the sharpness appear?

    python leaderboard/carrier_sharpness.py scenarios/watermas_mas_every.yaml --trace \
        --methods watermas --out leaderboard/watermas_sharpness_trace.csv

Classification scenarios only (cross-entropy on the test split); the cache is the default one
(``$WMBENCH_CACHE`` or ~/.cache/wmbench), and a training missing from it is trained first.
``--trace`` needs methods that embed while training (the default ``Method.embed``).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from wmbench.cache import default_cache_dir
from wmbench.grid import TrainCell, expand
from wmbench.metrics import accuracy
from wmbench.scenario import load_scenario
from wmbench.sharpness import loss_rise
from wmbench.train import Trainer
from wmbench.seeding import seeded
from wmbench.worker import CellWorker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--amount", type=float, default=0.5, help="carrier move in units of its tensor's std (default: 0.5)")
    parser.add_argument("--out", required=True, help="the CSV to write")
    parser.add_argument("--trace", action="store_true", help="train again and measure after every epoch")
    parser.add_argument("--methods", nargs="*", help="only these method labels (default: all)")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    worker = CellWorker(scenario, default_cache_dir(), "cpu", False)
    rows = []
    for cell in expand(scenario):
        if args.methods and cell.method.label not in args.methods:
            continue
        where = {"model": cell.model.label, "dataset": cell.dataset.label, "method": cell.method.label, "seed": cell.seed, "amount": args.amount}
        if args.trace:
            rows += [{**where, **point} for point in trace(worker, cell, args.amount)]
        else:
            model, key, _ = worker.trained(cell)
            rows.append({**where, "loss_rise": loss_rise(model.cpu().eval(), key, worker.data(cell), args.amount)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    print(table.pivot_table(index=["method", "epoch"] if args.trace else "method", columns="seed", values="loss_rise").round(3).to_string())


def trace(worker: CellWorker, cell: TrainCell, amount: float) -> list[dict[str, float]]:
    """The cell's training as the worker runs it (``Method.embed``), measured after every epoch."""
    data = worker.data(cell)
    cpu = torch.device("cpu")
    with seeded(cell.seed, cpu):
        model = cell.model.obj.build(data)
    trainer = Trainer(data, worker.scenario.training, cpu, torch.Generator().manual_seed(cell.seed), "trace", False)
    method = cell.method.obj
    points: list[dict[str, float]] = []
    with seeded(cell.seed, cpu):
        key = method.keygen(model, data, torch.Generator().manual_seed(cell.seed + 1))
        trainer.on_epoch = lambda net, epoch: points.append({"epoch": epoch, "loss_rise": loss_rise(net, key, data, amount), "accuracy": accuracy(net, data, cpu)})
        trainer.fit(model, method.step_fn(model, key))
    return points


if __name__ == "__main__":
    main()
