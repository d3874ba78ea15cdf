"""Control arm for per-tensor quantization: is a method's damage under `quantize` caused by its
carriers stretching each tensor's min-max range?

    python leaderboard/quantize_range_control.py scenarios/cifar10_speednet.yaml tartaglione:2 \
        --set datasets[0].args.layout=imagefolder --set datasets[0].args.root=../shared/data/cifar10

For each METHOD:SEED (its training must be in the cache: run the scenario first) it prints, per
weight tensor that holds carriers, the largest carrier against the largest other weight, then the
test error after the `quantize` attack (uniform min-max per tensor) and after the control: the same
quantizer with each tensor's range taken from its non-carrier weights, the carriers left as they
are. Where the attack ruins the model and the control does not, the carriers' range is the cause.
``--csv PATH`` also writes those errors as rows (method, seed, arm, bits, error %, device, threads),
the file a published claim is recomputed from.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import pandas as pd

import torch
from torch import nn

from wmbench.api import Carriers
from wmbench.attacks.quantize import quantize_rows
from wmbench.devices import device_label
from wmbench.grid import expand
from wmbench.metrics import accuracy
from wmbench.models import weight_params
from wmbench.scenario import load_scenario
from wmbench.worker import CellWorker


def carrier_masks(model: nn.Module, carriers: Carriers) -> dict[str, torch.Tensor]:
    """Weight tensor name -> flat boolean mask of the carriers (``Method.carriers``) in it."""
    masks = {n: torch.zeros(p.numel(), dtype=torch.bool) for n, p in weight_params(model).items()}
    for name, idx in carriers.items():
        if name in masks:
            masks[name][idx] = True
    return masks


@torch.no_grad()
def quantized(model: nn.Module, bits: int, masks: dict[str, torch.Tensor] | None) -> nn.Module:
    """A copy with every weight tensor quantized to ``bits``; with ``masks``, on the range of the
    non-carrier weights only, carriers untouched."""
    out = copy.deepcopy(model)
    for name, p in weight_params(out).items():
        flat = p.detach().view(-1).clone()
        keep = torch.zeros_like(flat, dtype=torch.bool) if masks is None else masks[name]
        flat[~keep] = quantize_rows(flat[~keep].reshape(1, -1), bits, False).view(-1)
        p.copy_(flat.view_as(p))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("cells", nargs="+", metavar="METHOD:SEED")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--csv", type=Path, help="also write the errors to this CSV")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    where = {"device": device_label(torch.device("cpu")), "torch_threads": torch.get_num_threads()}
    scenario = load_scenario(args.scenario, args.overrides)
    worker = CellWorker(scenario, Path(os.environ.get("WMBENCH_CACHE", Path.home() / ".cache" / "wmbench")), "cpu")
    cells = expand(scenario)
    for spec in args.cells:
        method, seed = spec.rsplit(":", 1)
        cell = next(c for c in cells if c.method.label == method and c.seed == int(seed))
        model, key, _ = worker.trained(cell)
        data = worker.data(cell)

        def error(m: nn.Module) -> float:
            return 100 * (1 - accuracy(m, data, torch.device("cpu")))

        masks = carrier_masks(model, cell.method.obj.carriers(key))
        clean = error(model)
        rows.append({"method": method, "seed": int(seed), "arm": "clean", "bits": None, "error": clean, **where})
        print(f"{method} seed {seed}: clean error {clean:.2f}")
        for name, p in weight_params(model).items():
            mask, flat = masks[name], p.detach().view(-1)
            if mask.any():
                print(f"  {name}: {int(mask.sum())} carriers, max |carrier| {flat[mask].abs().max():.3f}, "
                      f"max |other| {flat[~mask].abs().max():.3f}, std of the others {flat[~mask].std():.4f}")
        for bits in args.bits:
            attack, control = error(quantized(model, bits, None)), error(quantized(model, bits, masks))
            rows += [{"method": method, "seed": int(seed), "arm": arm, "bits": bits, "error": value, **where}
                     for arm, value in (("attack", attack), ("control", control))]
            print(f"  quantize {bits}: error {attack:.2f} (the attack), {control:.2f} (control: range of the non-carriers, carriers kept)")
    if args.csv:
        pd.DataFrame(rows).to_csv(args.csv, index=False, float_format="%.6g")
        print(args.csv)


if __name__ == "__main__":
    main()
