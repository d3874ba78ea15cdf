"""Attack plug-ins unlike the built-ins (a security researcher's probe, 2026-12-06): one that
overrides ``apply`` and is no identity at strength 0, one that returns a half-precision model
inside a chain. Each row must say what was measured, and the clean figures must stay clean."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU, plugin_scenario, run_scenario

from wmbench.api import AttackContext, apply_attack
from wmbench.grid import untouched_id
from wmbench.registry import ATTACKS, load_plugins

PLUGIN = '''
import copy
from dataclasses import dataclass

import torch
from torch import nn

from wmbench.api import Attack
from wmbench.grid import untouched_id
from wmbench.registry import ATTACKS


@ATTACKS.register("reinit_head")
@dataclass(frozen=True)
class ReinitHead(Attack):
    """Overrides apply and re-initialises the last Linear at every strength, 0 included."""

    def apply(self, model, strength, ctx):
        model = copy.deepcopy(model)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.normal_(0, 0.01 + strength, generator=ctx.rng)
        ctx.effect = 1.0
        return model

    def attack(self, model, strength, ctx):
        raise AssertionError("unused: apply is overridden")


@ATTACKS.register("to_bf16")
@dataclass(frozen=True)
class ToBF16(Attack):
    """A thief's bfloat16 copy (in place: the model it was given is bfloat16 too)."""

    def attack(self, model, strength, ctx):
        return model.to(torch.bfloat16)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """One file, registered once: the grid's scenarios name it, the unit tests build from it."""
    path = tmp_path_factory.mktemp("plugin") / "novel_attacks.py"
    path.write_text(PLUGIN)
    load_plugins([path.name], path.parent)
    return path


def test_strength_0_of_an_attack_overriding_apply_is_the_clean_model(tmp_path, plugin):
    """Strength 0 carries the clean figures (every attack's strength-0 rows pooled as `clean`), so
    an ``apply`` that re-initialised the head at strength 0 too put 80-90% error rows into the
    clean error and detection of every attack's table (none: clean 48.80% beside a clean error of
    45.56%, error_delta +3.25 for `clean`)."""
    path = plugin_scenario(tmp_path, plugin, "none, watermas", "{name: reinit_head, strengths: [1.0]}, {name: noise, strengths: [0.1]}",
                           name="reinit0")
    code, frame = run_scenario(path, tmp_path / "cache")
    assert code == 0 and frame["failure"].isna().all()
    zero = frame[frame["strength"] == 0]
    assert (zero["error"] == zero["error_clean"]).all(), zero[["method", "attack", "error", "error_clean"]]
    for _, rows in zero.groupby("method"):
        assert rows["detect_stat"].nunique() == 1 and rows["attack_effect"].eq(0).all()
    hit = frame[(frame["attack"] == "reinit_head") & (frame["strength"] == 1)]
    assert (hit["error"] > hit["error_clean"]).all()  # at strength 1 it still runs


def test_a_chain_element_overriding_apply_at_fixed_strength_0_is_skipped(plugin, watermas_model, digits):
    model, key = watermas_model
    ctx = AttackContext(digits, torch.Generator().manual_seed(0), CPU)
    out = apply_attack(ATTACKS.build("reinit_head", {}), model, 0.0, ctx)
    assert out is not model and all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values()))
    chain = ATTACKS.build("chain", {"attacks": [{"name": "reinit_head", "strength": 0.0}, "noise"]})
    noise = ATTACKS.build("noise", {})
    chained = apply_attack(chain, model, 0.1, AttackContext(digits, torch.Generator().manual_seed(0), CPU))
    alone = apply_attack(noise, model, 0.1, AttackContext(digits, torch.Generator().manual_seed(0), CPU))
    assert all(torch.equal(a, b) for a, b in zip(chained.state_dict().values(), alone.state_dict().values()))
    assert chain.version == "1+reinit_head=1:apply:0+noise=1"  # stored cells of such chains (which ran it) re-run
    assert untouched_id(ATTACKS.build("reinit_head", {}), 0.0) and not untouched_id(ATTACKS.build("reinit_head", {}), 1.0)
    assert not untouched_id(noise, 0.0)  # built-in cells keep their ids


def test_a_chain_casts_a_half_precision_step_back_before_the_next(plugin, watermas_model, digits):
    """A thief's bfloat16 copy then fine-tuned: the chain handed the bfloat16 model to finetune,
    which failed every cell with "Input type (torch.FloatTensor) and weight type (CPUBFloat16Type)
    should be the same"; a single cell casts the attack's result back to the trained precision."""
    model, _ = watermas_model
    chain = ATTACKS.build("chain", {"attacks": ["to_bf16", {"name": "finetune", "args": {"data_fraction": 0.2}, "strength": 1}]})
    ctx = AttackContext(digits, torch.Generator().manual_seed(0), CPU, progress=False)
    out = apply_attack(chain, model, 1.0, ctx)
    assert {p.dtype for p in out.parameters()} == {torch.float32}
    assert "step 1 (to_bf16): returned torch.bfloat16 weights: cast back to float32" in ctx.notes["detect_note"]
    last = AttackContext(digits, torch.Generator().manual_seed(0), CPU)
    out = apply_attack(ATTACKS.build("chain", {"attacks": ["permute", "to_bf16"]}), model, 1.0, last)
    assert {p.dtype for p in out.parameters()} == {torch.float32}  # the last step too, said as for the others
    assert "step 2 (to_bf16): returned torch.bfloat16 weights: cast back to float32" in last.notes["detect_note"]


def test_the_untouched_note_of_an_attack_that_changed_nothing_says_so():
    """A thief's wrapper (``nn.Sequential(model)``, ``torch.compile``), a model handed back in train
    mode, or a slow no-op: the row said the mark "lies outside the tensors it changed", of an attack
    that changed no tensor at all."""
    import copy

    from torch import nn

    from wmbench.carrier_change import untouched_carriers_note

    trained = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    carriers = {"0.weight": torch.tensor([0, 5])}
    attacked = copy.deepcopy(trained).train()
    assert untouched_carriers_note("train_mode", carriers, trained, attacked) == \
        "train_mode left all 2 of the key's carriers unchanged (it changed no weight or buffer of the model)"
    attacked[1].running_var.mul_(2)  # BatchNorm statistics only
    assert untouched_carriers_note("bn_stats", carriers, trained, attacked).endswith("(the mark lies outside the tensors it changed)")
