"""Every attack: identity at 0, effect growing with strength, works on a copy, deterministic; then
what each one promises (sparsity, bits, carriers altered, removed channels reported)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wmbench.api import AttackContext, Key
from wmbench.errors import NotApplicable, WmbenchError
from wmbench.image_mark import CarrierSet
from wmbench.models import weight_params
from wmbench.registry import ATTACKS, DATASETS, METHODS, MODELS

CPU = torch.device("cpu")

# name, args, increasing strengths (each > 0)
ATTACK_CASES = [
    ("noise", {}, [0.1, 0.5, 2.0]),
    ("prune", {}, [0.2, 0.5, 0.9]),
    ("prune", {"scope": "global"}, [0.2, 0.5, 0.9]),
    ("prune", {"mode": "structured"}, [0.2, 0.5, 0.9]),
    ("prune", {"mode": "structured", "scope": "global"}, [0.2, 0.5]),
    ("finetune", {"data_fraction": 0.25}, [1, 3]),
    ("quantize", {}, [2, 4, 8]),
    ("quantize", {"symmetric": True, "per_channel": True}, [1, 3, 6]),
    ("quantize", {"percentile": 99.0}, [2, 4, 8]),
    ("key_leak", {}, [0.01, 0.5, 1.0]),
    ("key_leak", {"count": True}, [10, 100, 1024]),
    ("scale", {}, [0.2, 1.0, 3.0]),
    ("scale", {"negate": True}, [0.2, 1.0]),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in a.items())}" for n, a, _ in ATTACK_CASES]


def context(data, key: Key | None = None, seed: int = 0) -> AttackContext:
    method = METHODS.build("watermas") if key is not None else None
    return AttackContext(data=data, rng=torch.Generator().manual_seed(seed), device=CPU, method=method, key=key)


def run(name: str, args: dict, model: nn.Module, strength: float, data, key: Key | None, seed: int = 0) -> tuple[nn.Module, AttackContext]:
    ctx = context(data, key, seed)
    return ATTACKS.build(name, args).apply(model, strength, ctx), ctx


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,args,strengths", ATTACK_CASES, ids=IDS)
def test_strength_zero_is_identity(name, args, strengths, watermas_model, digits):
    model, key = watermas_model
    attacked, ctx = run(name, args, model, 0, digits, key)
    assert attacked is not model
    assert same_state(state(attacked), state(model))
    assert ctx.effect == 0.0


@pytest.mark.parametrize("name,args,strengths", ATTACK_CASES, ids=IDS)
def test_effect_grows_with_strength_on_a_copy(name, args, strengths, watermas_model, digits):
    model, key = watermas_model
    before = state(model)
    effects = []
    for s in strengths:
        attacked, ctx = run(name, args, model, s, digits, key)
        assert attacked is not model and isinstance(ctx.effect, float)
        assert not same_state(state(attacked), before)
        effects.append(ctx.effect)
    assert effects == sorted(effects) and len(set(effects)) == len(effects), effects
    assert effects[0] > 0
    assert same_state(state(model), before)  # the input model is untouched


@pytest.mark.parametrize("name,args,strengths", ATTACK_CASES, ids=IDS)
def test_deterministic_for_a_seed(name, args, strengths, watermas_model, digits):
    model, key = watermas_model
    first, ctx1 = run(name, args, model, strengths[-1], digits, key, seed=7)
    second, ctx2 = run(name, args, model, strengths[-1], digits, key, seed=7)
    assert same_state(state(first), state(second))
    assert ctx1.effect == ctx2.effect


# --- pruning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic32():
    return DATASETS.build("synthetic", {"channels": 3, "size": 32, "n_train": 16, "n_test": 8}).load(None)


def test_unstructured_sparsity_is_the_strength(watermas_model, digits):
    model, _ = watermas_model
    for args in ({"scope": "global"}, {"scope": "layer"}, {}):  # the default is per layer (NNWTestbed, WRT)
        attacked, ctx = run("prune", args, model, 0.4, digits, None)
        assert ctx.effect == pytest.approx(0.4, abs=1e-3)
        if args.get("scope") != "global":
            for p in weight_params(attacked).values():
                assert float((p == 0).float().mean()) == pytest.approx(0.4, abs=1.0 / p.numel())
        assert [n for n, _ in attacked.named_parameters()] == [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError):
        run("prune", {}, model, 1.5, digits, None)


def output_channels_zeroed(layer: nn.Module) -> int:
    return int((layer.weight.detach().flatten(1).abs().sum(1) == 0).sum())


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_structured_zeroing_equals_removal(arch, synthetic32):
    torch.manual_seed(0)
    model = MODELS.build(arch).build(synthetic32)
    model.train()
    with torch.no_grad():
        model(synthetic32.train_x)  # non-trivial BN statistics
    model.eval()
    for scope in ("global", "layer"):
        zeroed, ctx_z = run("prune", {"mode": "structured", "scope": scope}, model, 0.4, synthetic32, None)
        removed, ctx_r = run("prune", {"mode": "structured", "scope": scope, "remove": True}, model, 0.4, synthetic32, None)
        assert ctx_r.notes["detect_note"] == "channels physically removed"
        assert ctx_z.effect == pytest.approx(ctx_r.effect, abs=1e-9)  # zeroed weights = removed weights
        assert sum(p.numel() for p in removed.parameters()) < sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(zeroed.eval()(synthetic32.test_x), removed.eval()(synthetic32.test_x), rtol=1e-4, atol=1e-5)
        layers = [m for m in zeroed.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert output_channels_zeroed(layers[-1]) == 0  # the classifier keeps all its outputs
        assert sum(output_channels_zeroed(m) for m in layers) > 0


def test_structured_removal_makes_detection_not_applicable(watermas_model, digits):
    model, key = watermas_model
    attacked, ctx = run("prune", {"mode": "structured", "remove": True}, model, 0.3, digits, key)
    assert ctx.notes["detect_note"] == "channels physically removed"
    with pytest.raises(NotApplicable):
        METHODS.build("watermas").detect(attacked, key)
    zeroed, _ = run("prune", {"mode": "structured"}, model, 0.3, digits, key)
    METHODS.build("watermas").detect(zeroed, key)  # shapes kept: detection runs


# --- quantization ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [{}, {"symmetric": True}, {"per_channel": True}, {"symmetric": True, "per_channel": True}])
def test_quantized_tensors_use_at_most_2_to_the_bits_values(args, watermas_model, digits):
    model, _ = watermas_model
    distance = []
    for bits in (1, 2, 3, 5):
        attacked, ctx = run("quantize", args, model, bits, digits, None)
        assert ctx.effect <= bits + 1e-9
        for p in weight_params(attacked).values():
            rows = p.detach().flatten(1) if args.get("per_channel") else p.detach().reshape(1, -1)
            assert all(len(torch.unique(r)) <= 2**bits for r in rows)
        original = weight_params(model)
        distance.append(sum(float((p - original[k]).detach().norm()) for k, p in weight_params(attacked).items()))
    assert distance == sorted(distance, reverse=True)  # more bits, weaker attack


def test_quantize_rejects_bad_bits_and_symmetric_keeps_zero(watermas_model, digits):
    model, _ = watermas_model
    for bad in (0.5, -1, 2.5):
        with pytest.raises(ValueError):
            run("quantize", {}, model, bad, digits, None)
    pruned, _ = run("prune", {}, model, 0.5, digits, None)
    quantized, _ = run("quantize", {"symmetric": True}, pruned, 4, digits, None)
    for k, p in weight_params(pruned).items():
        assert bool((weight_params(quantized)[k][p == 0] == 0).all())


def test_percentile_quantization_clamps_outliers_and_its_default_is_min_max():
    from wmbench.api import component_config
    from wmbench.attacks.quantize import quantize_rows

    bulk = torch.linspace(-0.1, 0.1, 999, dtype=torch.float64)
    row = torch.cat([bulk, torch.tensor([0.9], dtype=torch.float64)]).reshape(1, -1)
    lo, hi = row.min(), row.max()
    step = (hi - lo) / 15
    by_hand = torch.round((row - lo) / step) * step + lo  # the min-max grid, written out
    assert torch.equal(quantize_rows(row, 4, False), by_hand)
    clipped = quantize_rows(row, 4, False, 99.0)
    assert float(clipped.max()) <= 0.1 + 1e-12  # the outlier is clamped to the 99th percentile
    bulk_error = lambda q: float((q[0, :999] - bulk).abs().max())  # noqa: E731
    assert bulk_error(clipped) < bulk_error(by_hand) / 4  # a finer step for the other weights
    symmetric = quantize_rows(row, 4, True, 99.0)
    assert float(symmetric.abs().max()) <= 0.1 + 1e-12
    # at its default the added field stays out of the cell ids: stored quantize results keep theirs
    assert "percentile" not in component_config(ATTACKS.build("quantize"))["args"]
    assert component_config(ATTACKS.build("quantize", {"percentile": 99.9}))["args"]["percentile"] == 99.9


# --- fine-tuning -----------------------------------------------------------------------------


def test_finetune_trains_all_weights_and_keeps_accuracy(watermas_model, digits):
    from wmbench.metrics import accuracy

    model, key = watermas_model
    attacked, ctx = run("finetune", {"data_fraction": 0.5}, model, 1, digits, None)
    moved = [not torch.equal(p, weight_params(model)[k]) for k, p in weight_params(attacked).items()]
    assert all(moved) and ctx.effect > 0
    assert accuracy(attacked, digits, CPU) > 0.8
    with pytest.raises(Exception):
        ATTACKS.build("finetune", {"data_fraction": 0.0})


# --- key leak --------------------------------------------------------------------------------


def carriers_changed(a: nn.Module, b: nn.Module, key: Key) -> int:
    n = len(key.tensors["flat_idx"])
    return int((CarrierSet.bind(a, key).read(n) != CarrierSet.bind(b, key).read(n)).sum())


def test_key_leak_alters_exactly_count_carriers_and_detection_drops(watermas_model, digits):
    model, key = watermas_model
    n = len(key.tensors["flat_idx"])
    method = METHODS.build("watermas")
    stats = []
    cases = [(50, True, 50), (0.25, False, n // 4), (0.5, False, n // 2), (0.9, False, round(0.9 * n)), (1.0, False, n), (10 * n, True, n)]
    for strength, as_count, count in cases:
        attacked, ctx = run("key_leak", {"count": as_count}, model, strength, digits, key)
        assert ctx.effect == count
        assert carriers_changed(attacked, model, key) == count
        # nothing but carriers moves
        changed = sum(int((p != dict(model.named_parameters())[k]).sum()) for k, p in attacked.named_parameters())
        assert changed == count
        stats.append(method.detect(attacked, key).stat)
    assert stats[:4] == sorted(stats[:4], reverse=True) and stats[0] > 0.8 and max(stats[3:]) < 0.2, stats


def test_key_leak_strength_is_a_fraction_unless_count():
    fraction, count = ATTACKS.build("key_leak", {}), ATTACKS.build("key_leak", {"count": True})
    assert fraction.check_strength(1.0) is None and fraction.check_strength(0.3) is None
    assert "fraction" in fraction.check_strength(16)
    assert count.check_strength(16) is None


def test_key_leak_count_above_the_carriers_says_it_changed_them_all(watermas_model, digits):
    model, key = watermas_model
    total = len(key.tensors["flat_idx"])
    _, ctx = run("key_leak", {"count": True}, model, total * 10, digits, key)
    assert ctx.effect == total and f"{total * 10} carriers asked, the key has {total}" in ctx.notes["detect_note"]
    _, ctx = run("key_leak", {"count": True}, model, total, digits, key)
    assert "detect_note" not in ctx.notes


def test_key_leak_needs_the_key_and_falls_back_without_a_removal(watermas_model, digits):
    model, key = watermas_model
    with pytest.raises(WmbenchError):
        run("key_leak", {}, model, 0.1, digits, None)
    attacked, ctx = run("key_leak", {"use_method_removal": True, "count": True}, model, 10, digits, key)
    assert ctx.effect == 10 and carriers_changed(attacked, model, key) == 10


class TinyAttention(nn.Module):
    """A ViT-like block: nn.MultiheadAttention keeps its q/k/v projection as a bare parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        return self.head(self.attention(tokens, tokens, tokens, need_weights=False)[0].mean(1))


def test_weight_params_include_attention_projections():
    model = TinyAttention()
    names = list(weight_params(model))
    assert names == ["embed.weight", "attention.in_proj_weight", "attention.out_proj.weight", "head.weight"]
    assert set(names) <= dict(model.named_parameters()).keys()
    separate = nn.MultiheadAttention(16, 2, kdim=4, vdim=6)  # no in_proj_weight: one matrix each
    assert list(weight_params(separate)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


@pytest.mark.parametrize("name,args,strength", [("prune", {}, 1.0), ("prune", {"scope": "global"}, 1.0), ("noise", {}, 0.5), ("quantize", {}, 1)])
def test_attacks_reach_the_attention_projection(name, args, strength, digits):
    """torchvision's ViT holds about a quarter of its weights in in_proj_weight: prune 1.0 zeroes it,
    noise and quantization change it (they left it untouched when only Conv/Linear layers counted)."""
    torch.manual_seed(0)
    model = TinyAttention()
    before = model.attention.in_proj_weight.detach().clone()
    attacked, _ = run(name, args, model, strength, digits, None)
    after = attacked.attention.in_proj_weight.detach()
    assert not torch.equal(after, before)
    if name == "prune":
        assert int((after == 0).sum()) == after.numel()


def test_structured_zeroing_reaches_attention_and_tokens_of_a_vit():
    """Pruning a ViT's residual channels removes them from the patch embedding, every attention
    layer (q/k/v columns, output rows), the class token and the position embedding; zeroing only
    the Conv/Linear rows left the pruned channels carrying tokens and attention outputs."""
    from torchvision.models.vision_transformer import VisionTransformer

    data = DATASETS.build("synthetic", {"size": 32}).load(None)
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4)
    nn.init.normal_(model.heads.head.weight)
    nn.init.normal_(model.class_token)  # torchvision starts both at zero
    attacked, _ = run("prune", {"mode": "structured"}, model, 0.5, data, None)
    pruned = (attacked.conv_proj.weight.flatten(1).abs().sum(1) == 0).nonzero().flatten()
    assert 0 < len(pruned) < 16

    def zero(t: torch.Tensor, dim: int) -> torch.Tensor:
        return (t.abs().sum(tuple(d for d in range(t.dim()) if d != dim)) == 0).nonzero().flatten()

    for layer in attacked.encoder.layers:
        attention = layer.self_attention
        assert torch.equal(zero(attention.in_proj_weight, 1), pruned) and torch.equal(zero(attention.out_proj.weight, 0), pruned)
    assert torch.equal(zero(attacked.class_token, 2), pruned) and torch.equal(zero(attacked.encoder.pos_embedding, 2), pruned)


def test_structured_pruning_zeroes_convnext_layer_scale_along_its_channels():
    """ConvNeXt scales each block's output by a bare (C, 1, 1) parameter, layer_scale, for which
    torch-pruning gives the last dimension (of size 1): zeroing the pruned channels there raised
    IndexError, and every structured-pruning cell of convnext_tiny failed ("attack: IndexError:
    index 3 is out of bounds for dimension 2 with size 1"). The channels are zeroed along the
    dimension as long as the group, the channels that removal takes out (its outputs differ: a
    zeroed channel still counts in the LayerNorms' statistics)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    data = DATASETS.build("synthetic", {"size": 32}).load(None)
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=data.num_classes)
    for block in (m for m in model.modules() if hasattr(m, "layer_scale")):
        nn.init.normal_(block.layer_scale, 1.0, 0.2)  # torchvision starts it at 1e-6: outputs would hardly differ
    model.eval()
    zeroed, _ = run("prune", {"mode": "structured"}, model, 0.5, data, None)
    removed, _ = run("prune", {"mode": "structured", "remove": True}, model, 0.5, data, None)
    blocks = [m for m in zeroed.modules() if hasattr(m, "layer_scale")]
    kept = [m for m in removed.modules() if hasattr(m, "layer_scale")]
    assert len(blocks) == len(kept) == 2
    for block, other in zip(blocks, kept):
        rows = (block.block[5].weight.abs().sum(1) == 0).nonzero().flatten()  # the block's last Linear: its pruned outputs
        assert 0 < len(rows) and torch.equal((block.layer_scale.flatten() == 0).nonzero().flatten(), rows)
        assert other.layer_scale.shape[0] == block.layer_scale.shape[0] - len(rows)
