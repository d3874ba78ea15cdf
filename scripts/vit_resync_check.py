"""The function-preserving attacks on a ViT, and resync after them (README, "Structural attacks and
resynchronised detection"): torchvision's vit_b_16 at 32x32 on synthetic inputs, random weights, a
WaterMAS key; per attack, the output's relative change, plain and resynchronised Pearson r, resync time.

    python scripts/vit_resync_check.py
"""

from __future__ import annotations

import time

import torch

from wmbench.api import AttackContext
from wmbench.detection import detect
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS

ATTACKS_CHECKED = {
    "permute": ("permute", {}, 1.0),
    "scale-negate": ("scale", {"negate": True}, 1.0),
    "permute+scale-negate": ("chain", {"attacks": [{"name": "permute", "strength": 1.0}, {"name": "scale", "args": {"negate": True}}]}, 1.0),
}


@torch.no_grad()
def main() -> None:
    data = DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 8, "n_test": 4}).load(None)
    torch.manual_seed(0)
    model = MODELS.build("torchvision", {"arch": "vit_b_16", "options": {"image_size": 32}}).build(data).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero
    method = METHODS.build("watermas")
    key = method.finalize_key(model, method.keygen(model, data, torch.Generator().manual_seed(0)))
    carriers = method.carriers(key)
    in_attention = sum(len(v) for k, v in carriers.items() if "self_attention" in k)
    print(f"WaterMAS carriers in attention projections: {in_attention} of {sum(len(v) for v in carriers.values())}")
    clean = model(data.test_x)
    for label, (name, args, strength) in ATTACKS_CHECKED.items():
        ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        attacked = ATTACKS.build(name, args).apply(model, strength, ctx)
        change = float((attacked(data.test_x) - clean).abs().max() / clean.abs().max())
        plain = detect(method, attacked, key, 1e-6)
        start = time.perf_counter()
        synced = detect(method, attacked, key, 1e-6, reference=model, example=data.train_x[:2])
        print(f"{label}: output change {change:.1e}, effect {ctx.effect:.3f}, r plain {plain[0]:.3f} (detected {plain[3]}), "
              f"r resync {synced[0]:.3f} (detected {synced[3]}), resync {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
