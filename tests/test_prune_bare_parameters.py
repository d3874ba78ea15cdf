"""Structured zeroing of bare parameters (nn.Parameter used outside a layer): along the dimension
that holds the group's channels in this model's own graph, whatever ran before in the process; a
parameter with no such dimension (Swin's relative position bias tables) is left as it is."""

from __future__ import annotations

import torch
from torch import nn

from wmbench.api import AttackContext
from wmbench.registry import ATTACKS, DATASETS


def prune(model: nn.Module, strength: float, data, **args) -> nn.Module:
    """The structured prune attack's copy of ``model``."""
    ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    return ATTACKS.build("prune", {"mode": "structured", **args}).apply(model, strength, ctx)


class LayerScaled(nn.Module):
    """A conv whose channels a bare (C, 1, 1) parameter scales (ConvNeXt's layer_scale):
    torch-pruning prunes it along dim 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) * self.scale).mean((2, 3)))


class Tokens(nn.Module):
    """32 tokens of 8 channels and a bare (32, 8) position table added to them: torch-pruning
    prunes it along dim 1 (its channels); dim 0 (the tokens) is longer than the channels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.head = nn.Linear(32, 8), nn.Linear(8, 4)
        self.pos = nn.Parameter(torch.rand(32, 8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.mean(1))  # (N, 32 rows as tokens, 8 channels)
        return self.head(torch.relu(tokens + self.pos).mean(1))


def test_a_bare_parameter_is_zeroed_along_its_channels_whatever_ran_before():
    """torch-pruning keeps one ParameterPruner for the process, and pruning a model's channels
    out (``remove``) sets its ``pruning_dim`` to that model's parameter's: read from there, the
    next model's position table was zeroed along its tokens (dim 0), not its channels."""
    data = DATASETS.build("synthetic", {"size": 32}).load(None)
    first = prune(Tokens().eval(), 0.5, data)
    prune(LayerScaled().eval(), 0.5, data, remove=True)  # leaves the shared pruner at dim 0
    after = prune(Tokens().eval(), 0.5, data)
    for model in (first, after):
        pruned = (model.embed.weight.abs().sum(1) == 0).nonzero().flatten()
        assert len(pruned) == 4
        assert torch.equal((model.pos == 0).all(0).nonzero().flatten(), pruned)  # the pruned channels' columns
        assert int((model.pos == 0).sum()) == 32 * len(pruned)  # and nothing else
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), after.state_dict().values()))


def test_structured_zeroing_of_a_swin_leaves_its_position_bias_tables(monkeypatch):
    """torch-pruning couples Swin's residual stream to each block's relative position bias table
    ((2w - 1)^2, heads): one entry per head, none per channel. Where every pruned channel's index
    was below the heads' count (one channel, 0, pruned of 16), the table lost that head's column;
    the tables are left as they are. The stream also reaches attention's qkv and proj, used through
    F.linear, which torch-pruning reads as element-wise: since prune version 4 the stream's group is
    left unpruned whole (its weakest channel 0 included), and each MLP's hidden group loses as many
    channels as the strength says."""
    from torchvision.models.swin_transformer import SwinTransformer

    from wmbench import structured_pruning

    monkeypatch.setattr(structured_pruning, "INDEX_LIMIT", 20_000)  # the same groups analysed, 20 times faster
    data = DATASETS.build("synthetic", {"size": 16, "n_train": 4, "n_test": 2}).load(None)
    torch.manual_seed(0)
    model = SwinTransformer([4, 4], 16, [1, 1], [2, 4], [4, 4], stochastic_depth_prob=0.0, num_classes=data.num_classes).eval()
    block = model.features[1][0]
    with torch.no_grad():  # the stream's channel 0 the weakest
        for p in (model.features[0][0].weight, model.features[0][2].weight, block.norm1.weight, block.norm2.weight, block.mlp[3].weight):
            p[0] *= 1e-3
        block.mlp[0].weight[:, 0] *= 1e-3
    tables = [name for name, _ in model.named_parameters() if name.endswith("relative_position_bias_table")]
    attention = [name for name, _ in model.named_parameters() if ".attn.qkv." in name or ".attn.proj." in name]
    assert len(tables) == 2
    for strength, hidden in ((1 / 16, (4, 8)), (0.5, (32, 64))):
        ctx = AttackContext(data=data, rng=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        attacked = ATTACKS.build("prune", {"mode": "structured"}).apply(model, strength, ctx)
        assert ctx.notes["detect_note"] == (
            "2 of 5 channel groups left unpruned (torch-pruning cannot analyse them); structured prune: 4 Linear layers are "
            "used outside their forward (torch-pruning does not see them: their channels are not zeroed): "
            "features.1.0.attn.qkv, features.1.0.attn.proj, features.3.0.attn.qkv, features.3.0.attn.proj; 1 of 5 channel "
            "groups reach them and are left unpruned (torch-pruning cannot map channels through them)")
        assert torch.isfinite(attacked(data.test_x)).all()
        assert all(torch.equal(attacked.get_parameter(t), model.get_parameter(t)) for t in tables)
        zero_rows = {name: int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for name, m in attacked.named_modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d))}
        # the share of each pruned group: each MLP's hidden ones; the stream (patch embedding, the
        # MLP writing to it) reaches attention's qkv and proj, used through F.linear: left whole
        assert {name: rows for name, rows in zero_rows.items() if rows} == {"features.1.0.mlp.0": hidden[0], "features.3.0.mlp.0": hidden[1]}
        assert all(torch.equal(attacked.get_parameter(p), model.get_parameter(p)) for p in attention)
