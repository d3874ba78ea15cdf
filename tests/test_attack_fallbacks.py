"""Attacks whose graph analysis cannot cover a model degrade with a note, or fail with a clear error;
never a crash (swin_t's window reshapes, weights used through F.linear, untraceable models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wmbench.api import AttackContext
from wmbench.errors import WmbenchError
from wmbench.registry import ATTACKS, DATASETS, MODELS


@pytest.fixture(scope="module")
def tiny():
    return DATASETS.build("synthetic", {"channels": 3, "size": 8, "n_train": 4, "n_test": 2}).load(None)


def attack(name, args, model, strength, data):
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    return ATTACKS.build(name, args).apply(model, strength, ctx), ctx


def test_structured_prune_skips_groups_whose_index_mapping_explodes(tiny, monkeypatch):
    from wmbench import structured_pruning

    torch.manual_seed(0)
    model = MODELS.build("small_cnn").build(tiny).eval()
    _, full = attack("prune", {"mode": "structured"}, model, 0.5, tiny)
    assert "detect_note" not in full.notes
    # conv "3" -> pool(2) -> flatten -> linear maps 32 channels to 128 features: over a limit of 100
    monkeypatch.setattr(structured_pruning, "INDEX_LIMIT", 100)
    attacked, ctx = attack("prune", {"mode": "structured"}, model, 0.5, tiny)
    assert ctx.notes["detect_note"] == "1 of 3 channel groups left unpruned (torch-pruning cannot analyse them)"
    def zero_rows(w: torch.Tensor) -> int:
        return int((w.detach().flatten(1).abs().sum(1) == 0).sum())

    assert zero_rows(attacked[3].weight) == 0 and zero_rows(attacked[0].weight) > 0  # conv "3"'s group was skipped
    assert 0 < ctx.effect < full.effect


class FunctionalWeight(nn.Module):
    """A layer whose weight is used through F.linear (as swin_t's attention does): torch-pruning
    does not see it as a layer, so removing channels leaves it with the old shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(F.linear(h, self.mix.weight.t()))


class BufferProjection(nn.Module):
    """Features multiplied by a fixed matrix held in a buffer: torch-pruning reads the product as
    element-wise and has nothing to resize in it, so removing channels breaks the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("proj", torch.randn(8, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)) @ self.proj)


def test_prune_remove_that_breaks_the_model_is_a_clear_error(tiny):
    torch.manual_seed(0)
    model = BufferProjection().eval()
    with pytest.raises(WmbenchError, match="remove: false"):
        attack("prune", {"mode": "structured", "remove": True}, model, 0.5, tiny)
    attacked, ctx = attack("prune", {"mode": "structured"}, model, 0.5, tiny)  # zeroing still runs
    assert ctx.effect > 0 and attacked(tiny.test_x).shape == (2, 4)


class ReadsALayersWeight(nn.Module):
    """A block whose output goes through ``F.linear(h, self.mix.weight, self.mix.bias)`` (mix: 8 -> 6,
    never called), after a block torch-pruning sees whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mix = nn.Linear(8, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.conv0(x)))
        h = F.relu(self.bn(self.conv(h))).mean((2, 3))
        return self.fc(F.linear(h, self.mix.weight, self.mix.bias))


@pytest.mark.parametrize("remove", [False, True])
def test_structured_prune_leaves_groups_that_reach_a_layer_used_outside_its_forward(tiny, remove):
    """torch-pruning reads ``F.linear(h, mix.weight)`` as an element-wise operation: conv's channel i
    was coupled to the classifier's input i (mix's output i, unrelated), so pruning zeroed those
    classifier columns and never mix's, and with mix narrower than conv (6 of 8) an index past the
    classifier's 6 inputs raised IndexError, a traceback. conv's group is left unpruned now, with a
    note; conv0's group, which torch-pruning sees whole, is pruned (zeroed, or removed) as before,
    and nothing outside it changes."""
    torch.manual_seed(0)
    model = ReadsALayersWeight().eval()
    attacked, ctx = attack("prune", {"mode": "structured", "remove": remove}, model, 0.5, tiny)
    assert ctx.notes["detect_note"].endswith(
        "structured prune: 1 Linear layer is used outside its forward (torch-pruning does not see it: its channels are not "
        f"{'removed' if remove else 'zeroed'}): mix; 1 of 2 channel groups reach it and are left unpruned (torch-pruning cannot "
        "map channels through it)")
    before, after = model.state_dict(), attacked.state_dict()
    for name in ("conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "mix.weight", "mix.bias", "fc.weight", "fc.bias"):
        assert torch.equal(after[name], before[name]), name
    if remove:
        kept = [i for i in range(8) if any(torch.equal(attacked.conv0.weight[j], model.conv0.weight[i]) for j in range(4))]
        assert attacked.conv0.out_channels == attacked.conv.in_channels == len(kept) == 4
        assert torch.equal(attacked.conv.weight, model.conv.weight[:, kept])
    else:
        dropped = (attacked.conv0.weight.flatten(1) == 0).all(1)
        assert int(dropped.sum()) == 4 and bool((attacked.bn0.weight[dropped] == 0).all())
        assert torch.equal(attacked.conv.weight[:, ~dropped], model.conv.weight[:, ~dropped])
        assert bool((attacked.conv.weight[:, dropped] == 0).all())
    assert attacked(tiny.test_x).shape == (2, 4)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x)).flatten(1)


def test_scale_on_an_untraceable_model_is_the_identity_with_a_note(tiny):
    model = Untraceable().eval()
    attacked, ctx = attack("scale", {}, model, 1.0, tiny)
    assert ctx.effect == 0.0 and "cannot trace" in ctx.notes["detect_note"]
    assert all(torch.equal(p, q) for p, q in zip(attacked.state_dict().values(), model.state_dict().values()))


def test_structured_prune_names_layers_used_outside_their_forward(tiny, monkeypatch):
    """A Swin's attention runs qkv and proj through F.linear: torch-pruning never sees them, so a
    pruned channel of the stream keeps its qkv columns and proj rows; the note counts and names
    them. ``FunctionalWeight``'s mix likewise."""
    from torchvision.models.swin_transformer import SwinTransformer

    from wmbench import structured_pruning

    monkeypatch.setattr(structured_pruning, "INDEX_LIMIT", 20_000)  # the same groups analysed, faster
    data = DATASETS.build("synthetic", {"size": 16, "n_train": 4, "n_test": 2}).load(None)
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=10).eval()
    _, ctx = attack("prune", {"mode": "structured"}, swin, 0.5, data)
    assert ctx.notes["detect_note"].endswith(
        "; structured prune: 4 Linear layers are used outside their forward (torch-pruning does not see them: their channels "
        "are not zeroed): features.1.0.attn.qkv, features.1.0.attn.proj, features.3.0.attn.qkv, features.3.0.attn.proj; "
        "1 of 5 channel groups reach them and are left unpruned (torch-pruning cannot map channels through them)")
    _, ctx = attack("prune", {"mode": "structured"}, FunctionalWeight().eval(), 0.5, tiny)
    assert ctx.notes["detect_note"] == ("structured prune: 1 Linear layer is used outside its forward (torch-pruning does not "
                                        "see it: its channels are not zeroed): mix; 1 of 1 channel groups reach it and are left "
                                        "unpruned (torch-pruning cannot map channels through it)")


def test_structured_prune_of_models_whose_layers_all_run_has_no_such_note(tiny):
    from torchvision.models import VisionTransformer

    from wmbench.untraced_layers import layers_used_outside_forward

    torch.manual_seed(0)
    for model in (MODELS.build("small_cnn").build(tiny).eval(), MODELS.build("resnet18").build(tiny).eval()):
        _, ctx = attack("prune", {"mode": "structured"}, model, 0.5, tiny)
        assert "outside" not in ctx.notes.get("detect_note", "")
    # a ViT's out_proj is used by its nn.MultiheadAttention's functional forward, which is handled as a whole
    vit = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=4).eval()
    assert layers_used_outside_forward(vit, tiny.train_x[:2]) == []
    # tied weights: a head sharing a layer's weight is not used outside the forward of a layer
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.a(x.mean((2, 3)).repeat(1, 2)[:, :4])

    assert layers_used_outside_forward(Tied().eval(), tiny.train_x[:2]) == []
