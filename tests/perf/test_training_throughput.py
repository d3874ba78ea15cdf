"""Training images/s of the CIFAR models, plain and WaterMAS, in both memory formats (and bf16
on CUDA): one step on a CIFAR-sized batch of 256, as the Trainer runs it (``FastPath``: channels-
last inputs, weights in the default format; autocast when asked).

Run: ``OMP_NUM_THREADS=1 pytest tests/perf/test_training_throughput.py -m perf`` (images/s in the
``extra_info`` column: ``--benchmark-columns=median,ops`` and ``--benchmark-json``; ops x 256 is
images/s). Each model, device and precision is one benchmark group."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from wmbench.api import plain_step
from wmbench.data import DataBundle
from wmbench.registry import METHODS, MODELS
from wmbench.train import FastPath

pytestmark = pytest.mark.perf

BATCH = 256
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MODEL_SPECS = {  # label -> (registry name, args)
    "cifar_speednet": ("cifar_speednet", {}),
    "cifar_speednet-32": ("cifar_speednet", {"widths": [32, 128, 128]}),
    "resnet18": ("resnet18", {}),
    "resnet18_cifar": ("resnet18_cifar", {}),
}
CIFAR_MODELS = [label for label, (name, _) in MODEL_SPECS.items() if name in MODELS.names()]
PRECISIONS = {"cpu": ["fp32"], "cuda": ["fp32", "bf16"]}


def training_throughput(benchmark: Any, model_label: str, method: str, channels_last: bool, device_name: str, precision: str) -> None:
    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    data = DataBundle("bench", x, y, x[:8], y[:8], 10)
    torch.manual_seed(0)
    name, args = MODEL_SPECS[model_label]
    model = MODELS.build(name, args).build(data)
    built = None if method == "plain" else METHODS.build(method)
    key = built.keygen(model, data, torch.Generator().manual_seed(0)) if built else None  # as Method.embed: on the CPU model
    model.to(device)
    step_fn = built.step_fn(model, key) if built else plain_step  # bound after the move
    model.train()
    fast = FastPath(channels_last, precision, False, device)
    batch = (fast.inputs(x.to(device)), y.to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    net, step_fn = fast.prepare(model, step_fn)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)

    def step() -> None:
        step_fn(net, batch, loss_fn, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"{model_label} {device_name} {precision} batch {BATCH}"
    rounds = 20 if device.type == "cuda" else 2
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("model_label", CIFAR_MODELS)
@pytest.mark.parametrize("method", ["plain", "watermas"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_training_images_per_second(benchmark, model_label: str, method: str, channels_last: bool, device_name: str) -> None:
    for precision in PRECISIONS[device_name][-1:]:  # fp32 on the CPU, bf16 on CUDA
        training_throughput(benchmark, model_label, method, channels_last, device_name, precision)

