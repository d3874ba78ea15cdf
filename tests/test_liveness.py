"""The structural liveness mask: dead weights are exactly those no input reaches; image marks never
put a carrier there; prune and noise say what they did to the live weights; ``wmbench inspect``."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.cli import main
from wmbench.data import DataBundle
from wmbench.errors import ConfigError
from wmbench.image_mark import draw_key
from wmbench.liveness import live_map, weight_dead_fraction
from wmbench.models import weight_params
from wmbench.registry import ATTACKS, METHODS, MODELS

SHAPE = (1, 4, 4)


def shrinking_net() -> nn.Module:
    """4x4 -> 2x2 -> 1x1 -> 1x1: the last 3x3 conv runs on a single pixel (only its centre tap is
    live), the second on 2x2 with stride 2 (4 of 9 taps live). Linear, so that every live weight
    has a non-zero gradient for a generic input."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )


def bundle(shape: tuple[int, int, int] = SHAPE, n: int = 8) -> DataBundle:
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 2
    return DataBundle("synthetic", x, y, x, y, 2)


def gradient_dead(model: nn.Module, shape: tuple[int, ...], n: int = 4) -> dict[str, torch.Tensor]:
    """Per weight tensor: True where the gradient of the summed outputs is exactly zero for all of
    ``n`` random inputs (the definition the structural mask must agree with)."""
    dead = {k: torch.ones_like(p, dtype=torch.bool) for k, p in weight_params(model).items()}
    for i in range(n):
        model.zero_grad()
        model(torch.randn(2, *shape, generator=torch.Generator().manual_seed(i))).sum().backward()
        for k, p in weight_params(model).items():
            dead[k] &= p.grad == 0
    return dead


def test_mask_equals_zero_gradient_on_a_linear_net():
    model = shrinking_net()
    live = live_map(model, SHAPE)
    dead = gradient_dead(model, SHAPE)
    for name in dead:
        assert torch.equal(~live.mask(name), dead[name]), name
    assert live.taps["2.weight"].flatten().tolist() == [False] * 4 + [True] + [False] * 4
    assert int(live.taps["1.weight"].sum()) == 4


class FlagNet(nn.Module):
    """A plug-in-style model whose forward pools its input when ``pool`` is set: an attribute its
    ``repr`` does not show, so two instances differ in liveness with one repr and one set of
    parameters."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = nn.functional.max_pool2d(x, 4)  # 4x4 -> 1x1: only the centre taps can see the input
        return self.body(x).flatten(1)


def test_liveness_follows_the_forward_not_the_repr():
    """Both instances have one repr and one set of parameter shapes; each gets its own mask (a
    cache keyed on them gave the second the first's: carriers drawn among taps that see nothing)."""
    plain, pooled = FlagNet(False), FlagNet(True)
    assert repr(plain) == repr(pooled)
    for model in (plain, pooled):
        live = live_map(model, SHAPE)
        dead = gradient_dead(model, SHAPE)
        for name in dead:
            assert torch.equal(~live.mask(name), dead[name]), name
    assert weight_dead_fraction(pooled, SHAPE) > weight_dead_fraction(plain, SHAPE)


def test_resnet18_at_32_pixels_is_mostly_dead_and_the_cifar_stem_is_not():
    data = bundle((3, 32, 32), n=2)
    torchvision_r18 = MODELS.build("resnet18").build(data)
    dead = weight_dead_fraction(torchvision_r18, (3, 32, 32))
    assert 0.6 < dead < 0.65
    by_gradient = gradient_dead(torchvision_r18.train(), (3, 32, 32), n=1)
    live = live_map(torchvision_r18, (3, 32, 32))
    for name, zero in by_gradient.items():  # every weight marked dead has a zero gradient
        assert bool(zero[~live.mask(name)].all()), name
    assert weight_dead_fraction(MODELS.build("resnet18_cifar").build(data), (3, 32, 32)) == 0.0


@pytest.mark.parametrize("method", ["watermas", "none", "tartaglione"])
def test_a_dead_tap_never_holds_a_carrier_and_a_live_one_can(method):
    model = shrinking_net()
    live = live_map(model, SHAPE)
    scope = {"tartaglione": "all"}.get(method, "weights")
    candidates = [k for k, _ in model.named_parameters()] if scope == "all" else list(weight_params(model))
    n_live = sum(live.live_count(k) for k in candidates)
    key = METHODS.build(method, {"n_carriers": n_live}).keygen(model, bundle(), torch.Generator().manual_seed(0))
    names = key.meta["params"]
    held = {k: torch.zeros(live.numel(k), dtype=torch.bool) for k in names}
    for pid, idx in zip(key.tensors["param_id"].tolist(), key.tensors["flat_idx"].tolist()):
        held[names[pid]][idx] = True
    for k in names:  # every live weight holds one (n = all live), no dead one does
        assert torch.equal(held[k], live.mask(k).reshape(-1)), k
    with pytest.raises(ConfigError, match="can affect the output"):
        METHODS.build(method, {"n_carriers": n_live + 1}).keygen(model, bundle(), torch.Generator().manual_seed(0))


def test_a_model_without_dead_weights_gets_the_same_draw():
    data = bundle((1, 8, 8))
    model = MODELS.build("small_cnn", {"width": 4, "hidden": 8}).build(data)
    plain = draw_key(model, "w", 100, "weights", None, torch.Generator().manual_seed(3))
    live = draw_key(model, "w", 100, "weights", None, torch.Generator().manual_seed(3), (1, 8, 8))
    assert all(torch.equal(plain.tensors[k], live.tensors[k]) for k in plain.tensors)


def test_prune_reports_the_share_of_live_weights_it_zeroed():
    model = shrinking_net()
    live = live_map(model, SHAPE)
    with torch.no_grad():  # dead weights only feel weight decay: make them the smallest
        for name, p in weight_params(model).items():
            p.mul_(live.mask(name)).add_(1e-6 * ~live.mask(name))
    ctx = AttackContext(bundle(), torch.Generator().manual_seed(0), torch.device("cpu"))
    pruned = ATTACKS.build("prune").apply(model, 0.5, ctx)
    zeros = sum(int(((p == 0) & live.mask(k)).sum()) for k, p in weight_params(pruned).items())
    total = sum(live.live_count(k) for k in weight_params(pruned))
    share = float(re.search(r"live weights: ([\d.]+)% zeroed", ctx.notes["detect_note"]).group(1))
    assert share == pytest.approx(100 * zeros / total, abs=0.05)
    assert share < 50.0 and ctx.effect == pytest.approx(0.5, abs=0.01)  # the dead went first


def test_noise_reports_its_distance_on_live_weights_only_when_some_are_dead():
    ctx = AttackContext(bundle(), torch.Generator().manual_seed(0), torch.device("cpu"))
    ATTACKS.build("noise").apply(shrinking_net(), 1.0, ctx)
    assert "live weights: relative distance" in ctx.notes["detect_note"]
    data = bundle((1, 8, 8))
    ctx = AttackContext(data, torch.Generator().manual_seed(0), torch.device("cpu"))
    ATTACKS.build("noise").apply(MODELS.build("small_cnn").build(data), 1.0, ctx)
    assert "detect_note" not in ctx.notes


def test_inspect_prints_names_shapes_counts_and_dead_shares(capsys):
    assert main(["inspect", "resnet18", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layer4\.1\.conv2\.weight\s+512x512x3x3\s+2,359,296\s+88\.9%", out)
    assert re.search(r"conv1\.weight\s+64x3x7x7\s+9,408\s+0\.0%", out)
    assert "Conv/Linear weights: 11,172,032 in 21 tensors; dead 62.2%" in out
    assert main(["inspect", "small_cnn", "--dataset", "digits", "--arg", "width=4"]) == 0
    out = capsys.readouterr().out
    assert "input 1x8x8" in out and re.search(r"0\.weight\s+4x1x3x3\s+36\s+0\.0%", out)
    assert main(["inspect", "resnt18"]) == 2
    assert "did you mean: resnet18" in capsys.readouterr().err
    # a model that cannot take the input at all is an error, not a table of "0.0% dead"
    assert main(["inspect", "torchvision", "--arg", "arch=squeezenet1_1", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "torchvision {'arch': 'squeezenet1_1'} does not run on digits inputs of shape 1x8x8 (RuntimeError: " in err


def test_inspect_takes_dataset_arguments(capsys):
    """The input size of a configurable dataset (synthetic's size and channels) was the default's."""
    assert main(["inspect", "small_cnn", "--dataset", "synthetic", "--dataset-arg", "size=16", "--dataset-arg", "channels=1"]) == 0
    assert "input 1x16x16" in capsys.readouterr().out
    assert main(["inspect", "small_cnn", "--dataset", "synthetic", "--dataset-arg", "size"]) == 2
    assert "--dataset-arg expects FIELD=VALUE" in capsys.readouterr().err


def test_inspect_loads_a_plugin_model(tmp_path, capsys):
    """The README sends plug-in authors to `inspect` for parameter names; their model must be reachable."""
    (tmp_path / "tiny_mlp.py").write_text(
        "from dataclasses import dataclass\nfrom torch import nn\nfrom wmbench.models import Model\nfrom wmbench.registry import MODELS\n\n"
        "@MODELS.register('inspect_mlp')\n@dataclass(frozen=True)\nclass InspectMLP(Model):\n"
        "    def build(self, data):\n        return nn.Sequential(nn.Flatten(), nn.Linear(data.in_channels * 64, data.num_classes))\n"
    )
    assert main(["inspect", "inspect_mlp", "--dataset", "digits", "--plugin", str(tmp_path / "tiny_mlp.py")]) == 0
    assert re.search(r"1\.weight\s+10x64\s+640\s+0\.0%", capsys.readouterr().out)


CACHE_RECORDING_DATASET = '''
from dataclasses import dataclass

import torch

from wmbench.data import DataBundle, Dataset
from wmbench.registry import DATASETS


@DATASETS.register("cache_recording")
@dataclass(frozen=True)
class CacheRecording(Dataset):
    """Writes a file into the cache directory it is loaded from."""

    def load(self, cache_dir):
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "loaded_here").write_text("")
        x = torch.zeros(4, 1, 8, 8)
        return DataBundle("cache_recording", x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long), 2)
'''


def test_inspect_reads_the_dataset_from_the_cache_that_run_uses(tmp_path, monkeypatch, capsys):
    """--cache as run, null and curve take it; without it $WMBENCH_CACHE, as for them (not always ~/.cache)."""
    plugin = tmp_path / "cache_recording.py"
    plugin.write_text(CACHE_RECORDING_DATASET)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("WMBENCH_CACHE", str(tmp_path / "env_cache"))
    args = ["inspect", "small_cnn", "--dataset", "cache_recording", "--arg", "width=4", "--plugin", str(plugin)]
    assert main([*args, "--cache", str(tmp_path / "given")]) == 0
    assert (tmp_path / "given" / "loaded_here").exists() and not (tmp_path / "env_cache").exists()
    assert main(args) == 0
    assert (tmp_path / "env_cache" / "loaded_here").exists() and not (tmp_path / "home").exists()
    assert "small_cnn on cache_recording: input 1x8x8, 2 classes" in capsys.readouterr().out
    from wmbench.cli import parser

    assert "--cache" in parser()._subparsers._group_actions[0].choices["inspect"].format_help()
