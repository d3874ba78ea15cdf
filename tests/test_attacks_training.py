"""fine_prune, overwrite and distill: identity at 0, on a copy, deterministic, and what each promises."""

from __future__ import annotations

import pytest
import torch

from wmbench.api import AttackContext
from wmbench.registry import ATTACKS, DATASETS, METHODS

CPU = torch.device("cpu")
FAST = {"fine_prune": {"epochs": 1}, "overwrite": {}, "distill": {"epochs": 2}}
STRENGTH = {"fine_prune": 0.5, "overwrite": 1.0, "distill": 0.5}
UNTOUCHED_EFFECT = {"fine_prune": 0.0, "overwrite": 0.0, "distill": 1.0}  # no channel pruned, no distance, full agreement


@pytest.fixture(scope="module")
def digits400():
    return DATASETS.build("digits", {"subset_train": 400}).load(None)


def run(name, model, key, data, strength=None, seed=0, **args):
    method = METHODS.build("watermas")
    ctx = AttackContext(data, torch.Generator().manual_seed(seed), CPU, method, key, progress=False)
    strength = STRENGTH[name] if strength is None else strength
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the worker seeds the global RNG for each cell too
        out = ATTACKS.build(name, {**FAST[name], **args}).apply(model, strength, ctx)
    return out, ctx


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items())


@pytest.mark.parametrize("name", list(FAST))
def test_identity_copy_determinism(name, watermas_model, digits400):
    model, key = watermas_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zero, ctx = run(name, model, key, digits400, strength=0.0)
    assert same(zero, model) and ctx.effect == UNTOUCHED_EFFECT[name]
    one, ctx = run(name, model, key, digits400)
    two, _ = run(name, model, key, digits400)
    assert same(one, two) and not same(one, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the original was modified"
    assert ctx.effect > 0


def test_fine_prune_keeps_the_least_active_channels_at_zero(watermas_model, digits400):
    model, key = watermas_model
    out, ctx = run("fine_prune", model, key, digits400, strength=0.5)
    conv, bn = out[3], out[4]  # small_cnn's last conv and its BatchNorm
    dead = conv.weight.detach().flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == conv.weight.shape[0] // 2 == round(ctx.effect * conv.weight.shape[0])
    assert bool((bn.weight[dead] == 0).all() and (bn.bias[dead] == 0).all())


def test_overwrite_embeds_the_attackers_mark(watermas_model, digits400):
    model, key = watermas_model
    method = METHODS.build("watermas")
    out, ctx = run("overwrite", model, key, digits400)
    theirs = ctx.notes["attacker_key"]
    assert not torch.equal(theirs.tensors["flat_idx"], key.tensors["flat_idx"])
    assert method.detect(out, theirs).stat > 0.99
    assert method.detect(out, key).stat < method.detect(model, key).stat


def test_distill_copies_the_function_not_the_mark(watermas_model, digits400, digits):
    model, key = watermas_model
    method = METHODS.build("watermas")
    out, ctx = run("distill", model, key, digits400, strength=1.0, epochs=10)
    assert ctx.effect > 0.5  # the student agrees with the teacher on most test images
    assert all(p.shape == q.shape for p, q in zip(out.parameters(), model.parameters()))
    assert not method.detect(out, key).detected(1e-6)


@pytest.mark.parametrize("name", ["finetune", *FAST])
def test_retraining_attacks_run_on_the_scenarios_fast_path(name, watermas_model, digits400):
    """A retraining attack trains with the scenario's precision (here bf16 autocast), fp32 without one."""
    from wmbench.train import TrainingConfig

    model, key = watermas_model
    seen: list[bool] = []
    hook = model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        for training, autocast in [(None, False), (TrainingConfig(precision="bf16"), True)]:
            seen.clear()
            ctx = AttackContext(digits400, torch.Generator().manual_seed(0), CPU, METHODS.build("watermas"), key, progress=False, training=training)
            ATTACKS.build(name, FAST.get(name, {})).apply(model, STRENGTH.get(name, 1.0), ctx)
            assert seen and any(seen) == autocast
    finally:
        hook.remove()


def test_the_distilled_student_keeps_no_teacher_weight():
    from wmbench.attacks.distill import fresh_copy

    class Tokens(torch.nn.Module):  # a transformer's pieces: attention, and a parameter no module resets
        def __init__(self) -> None:
            super().__init__()
            self.token = torch.nn.Parameter(torch.randn(1, 1, 8))
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

    teacher = Tokens()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5)  # "trained"
    student = fresh_copy(teacher, torch.Generator().manual_seed(0))
    same = [n for (n, p), q in zip(teacher.named_parameters(), student.parameters()) if torch.equal(p, q)]
    assert same == []


def test_a_chain_step_at_strength_0_records_the_untouched_effect(watermas_model, digits400):
    """distill's effect is an agreement: its untouched model agrees with itself (it read 0.0)."""
    model, key = watermas_model
    ctx = AttackContext(digits400, torch.Generator().manual_seed(0), CPU, METHODS.build("watermas"), key, progress=False)
    chain = ATTACKS.build("chain", {"attacks": ["noise", {"name": "distill", "strength": 0.0}]})
    chain.apply(model, 0.1, ctx)
    assert ctx.effect == 1.0
