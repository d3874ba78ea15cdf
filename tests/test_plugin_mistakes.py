"""A day-one researcher's plug-in mistakes, and marks an attack makes unreadable (found by a
newcomer's walkthrough, 2026-12-05): each is one clear line, found as early as possible, and a
mark its owner can no longer read is not counted as surviving."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest
from conftest import plugin_scenario, run_scenario

from wmbench.cli import main
from wmbench.leaderboard import render_markdown, read_results
from wmbench.summary import summarize_frame

MISTAKES = '''
import os
from dataclasses import dataclass

import torch
from torch import nn

from wmbench.api import Attack
from wmbench.methods.watermas import WaterMAS
from wmbench.methods.uchida import Uchida
from wmbench.registry import ATTACKS, METHODS


@METHODS.register("tuple_detector")
@dataclass(frozen=True)
class TupleDetector(WaterMAS):
    def detect(self, model, key):
        d = super().detect(model, key)
        return (d.stat, d.pvalue)


@METHODS.register("no_carriers")
@dataclass(frozen=True)
class NoCarriers(Uchida):
    def carriers(self, key):
        return {}


@METHODS.register("relu_swap")
@dataclass(frozen=True)
class ReluSwap(Uchida):
    """Swaps the model's ReLUs for Tanh in keygen: no parameter changes, a checkpoint cannot hold it."""

    def keygen(self, model, data, rng):
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.ReLU):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, nn.Tanh())
        return super().keygen(model, data, rng)


@METHODS.register("list_carriers")
@dataclass(frozen=True)
class ListCarriers(Uchida):
    def carriers(self, key):
        return {name: idx.tolist() for name, idx in super().carriers(key).items()}


@METHODS.register("buffer_carriers")
@dataclass(frozen=True)
class BufferCarriers(Uchida):
    """Says its mark sits in the first BatchNorm's running mean (a buffer, not a parameter)."""

    def carriers(self, key):
        return {"1.running_mean": torch.arange(4)}


@ATTACKS.register("state_dict_thief")
@dataclass(frozen=True)
class StateDictThief(Attack):
    def attack(self, model, strength, ctx):
        return model.state_dict()


class Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@ATTACKS.register("wrap")
@dataclass(frozen=True)
class Wrap(Attack):
    """Function-preserving: the same model under another module (every name gains 'inner.')."""

    def attack(self, model, strength, ctx):
        return Wrapped(model)


@ATTACKS.register("fold_carriers")
@dataclass(frozen=True)
class FoldCarriers(Attack):
    """Stores each carrier tensor under another name (as folding one layer into the next would):
    the forward is unchanged, the key no longer finds its tensors; costs nothing."""

    def attack(self, model, strength, ctx):
        for name in ctx.method.carriers(ctx.key):
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            weight = getattr(module, attr)
            del module._parameters[attr]
            module.register_parameter("folded_" + attr, weight)
            object.__setattr__(module, attr, weight)  # the forward reads the same tensor
        return model
'''


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistakes")
    plugin = folder / "mistakes.py"
    plugin.write_text(MISTAKES)
    return plugin


def test_a_wrong_method_signature_is_refused_at_registration():
    from dataclasses import dataclass

    from wmbench.methods.watermas import WaterMAS
    from wmbench.registry import METHODS

    with pytest.raises(TypeError, match=r"BadSignature overrides detect\(self, model\), which cannot take the arguments of detect\(self, model, key\)"):
        @METHODS.register("bad_signature")
        @dataclass(frozen=True)
        class BadSignature(WaterMAS):
            def detect(self, model):
                return None

    assert "bad_signature" not in METHODS.names()


def test_keygen_without_return_stops_the_run_before_training(tmp_path, capsys):
    plugin = tmp_path / "forgot.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from wmbench.methods.uchida import Uchida
        from wmbench.registry import METHODS

        @METHODS.register("forgot_return")
        @dataclass(frozen=True)
        class ForgotReturn(Uchida):
            def keygen(self, model, data, rng):
                super().keygen(model, data, rng)
    '''))
    path = plugin_scenario(tmp_path, plugin, "forgot_return", name="forgot")
    assert main(["run", str(path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "methods[0]: ForgotReturn.keygen returned NoneType, not a wmbench.api.Key" in err, err
    assert not (tmp_path / "c" / "models").exists() or not any((tmp_path / "c" / "models").iterdir())


def test_wrong_return_types_fail_their_cells_with_the_contract(tmp_path, mistakes):
    path = plugin_scenario(tmp_path, mistakes, "tuple_detector, uchida", "{name: state_dict_thief, strengths: [1.0]}", name="returns")
    code, frame = run_scenario(path, tmp_path / "c")
    failures = set(frame["failure"].dropna())
    assert any("TupleDetector.detect returned tuple, not a wmbench.api.Detection" in f for f in failures), failures
    assert any("StateDictThief returned OrderedDict, not the attacked torch.nn.Module" in f for f in failures), failures


def test_a_method_that_swaps_a_module_fails_its_training_not_every_row(tmp_path, mistakes):
    """A checkpoint holds parameters and buffers: a keygen that swaps ReLU for Tanh trained one model
    and would have every row measure another (clean rows at +25 points error_delta)."""
    path = plugin_scenario(tmp_path, mistakes, "relu_swap, uchida", name="swap")
    code, frame = run_scenario(path, tmp_path / "c")
    assert code == 3
    swapped = frame[frame["method"] == "relu_swap"]
    assert swapped["error"].isna().all() and swapped["failure"].str.contains(
        r"computes another function than the trained one \(outputs \S+ apart; at '\S+' the trained model has a Tanh, the rebuilt one a ReLU\)").all()
    assert frame[frame["method"] == "uchida"]["failure"].isna().all()


def test_settings_that_do_not_change_the_evaluated_model_and_traced_models_train(tmp_path):
    """What a checkpoint cannot hold but evaluation does not read (BatchNorm momentum None to
    re-estimate statistics, a dropout rate) is no module swap; nor is a torch.fx-traced model, whose
    every build has its own class."""
    plugin = tmp_path / "benign.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass

        from torch import fx, nn

        from wmbench.methods.uchida import Uchida
        from wmbench.models import SmallCNN
        from wmbench.registry import METHODS, MODELS

        @METHODS.register("momentum_none")
        @dataclass(frozen=True)
        class MomentumNone(Uchida):
            def keygen(self, model, data, rng):
                for module in model.modules():
                    if isinstance(module, nn.BatchNorm2d):
                        module.momentum = None
                    if isinstance(module, nn.Dropout):
                        module.p = 0.3
                return super().keygen(model, data, rng)

        @MODELS.register("traced_cnn")
        @dataclass(frozen=True)
        class TracedCNN(SmallCNN):
            def build(self, data):
                return fx.symbolic_trace(super().build(data))
    '''))
    path = plugin_scenario(tmp_path, plugin, "momentum_none, uchida", name="benign",
                           models="{name: small_cnn, args: {width: 8, hidden: 16}}, {name: traced_cnn, args: {width: 8, hidden: 16}}")
    code, frame = run_scenario(path, tmp_path / "c")
    assert code == 0, frame["failure"].dropna().tolist()


def test_carriers_of_the_wrong_type_name_the_contract(tmp_path, mistakes):
    path = plugin_scenario(tmp_path, mistakes, "list_carriers", name="lists")
    code, frame = run_scenario(path, tmp_path / "c")
    assert code == 3
    assert frame["failure"].str.contains("carriers\\(\\) must return a dict of tensor name -> 1-D integer torch.Tensor of flat positions; it holds '").all()


def test_key_leak_overwrites_carriers_that_sit_in_a_buffer(tmp_path, mistakes):
    path = plugin_scenario(tmp_path, mistakes, "buffer_carriers", "{name: key_leak, strengths: [1.0]}", name="buffers")
    code, frame = run_scenario(path, tmp_path / "c")
    assert code == 0, frame["failure"].dropna().tolist()
    leaked = frame[frame["strength"] == 1.0].iloc[0]
    assert leaked["attack_effect"] == 4 and pd.isna(leaked["failure"])


def test_a_plugin_that_registers_nothing_is_named_in_the_unknown_name_error(tmp_path, capsys):
    plugin = tmp_path / "unregistered.py"
    plugin.write_text("from dataclasses import dataclass\nfrom wmbench.methods.uchida import Uchida\n\n\n@dataclass(frozen=True)\nclass Forgot(Uchida):\n    pass\n")
    path = plugin_scenario(tmp_path, plugin, "forgot_to_register", name="unreg")
    assert main(["run", str(path), "--dry-run", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'forgot_to_register'" in err and "plug-in unregistered.py registered nothing (a missing @METHODS.register(...)?)" in err, err


def test_key_leak_on_a_key_without_carriers_is_not_applicable_not_a_survival(tmp_path, mistakes):
    path = plugin_scenario(tmp_path, mistakes, "no_carriers", "{name: key_leak, strengths: [1.0]}", name="leak")
    code, frame = run_scenario(path, tmp_path / "c")
    row = frame[frame["strength"] == 1.0].iloc[0]
    assert pd.isna(row["detected"]) and row["detect_note"].startswith("attack not applicable: the key of 'no_carriers' names no carriers"), row["detect_note"]


def test_run_takes_plugin_files_from_the_command_line(tmp_path, mistakes):
    path = tmp_path / "cli_plugin.yaml"
    path.write_text(plugin_scenario(tmp_path, mistakes, "uchida", "{name: wrap, strengths: [1.0]}", name="cli_plugin").read_text().replace(f"plugins: [{mistakes}]", "plugins: []"))
    assert main(["run", str(path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q", "--plugin", str(mistakes)]) == 0


def test_a_wrapped_model_is_detected_in_its_submodule(tmp_path, mistakes):
    """A thief's wrapper (or torch.compile's _orig_mod.) renames every tensor: detection finds the
    key's tensors under the prefix, and the mark survives as it does unwrapped."""
    path = plugin_scenario(tmp_path, mistakes, "uchida, watermas", "{name: wrap, strengths: [1.0]}", name="wrapped")
    code, frame = run_scenario(path, tmp_path / "c")
    assert code == 0
    for method in ("uchida", "watermas"):
        rows = frame[(frame["method"] == method)]
        clean, wrapped = rows[rows["strength"] == 0].iloc[0], rows[rows["strength"] == 1.0].iloc[0]
        assert wrapped["detect_stat"] == pytest.approx(clean["detect_stat"]) and wrapped["detected"] == clean["detected"]
        assert "found under 'inner'" in wrapped["detect_note"]


def test_a_mark_the_attack_makes_unreadable_counts_as_removed(tmp_path, mistakes):
    path = plugin_scenario(tmp_path, mistakes, "watermas", "{name: fold_carriers, strengths: [1.0]}", name="unreadable")
    code, frame = run_scenario(path, tmp_path / "c")
    attacked = frame[frame["strength"] == 1.0]
    assert attacked["detected"].isna().all() and attacked["detect_note"].str.contains("detection not applicable").all()
    table = read_results(path.parent / "lb" / "unreadable.csv")
    [group] = summarize_frame(table)
    [watermas] = group.methods
    assert watermas.clean.hits == 1
    removal = watermas.removals["fold_carriers"]
    assert removal.cheap and removal.unreadable and "(unreadable)" in removal.text()
    markdown = render_markdown(table, "unreadable")
    assert "1 unreadable" in markdown and "fold_carriers" in markdown.split("### ")[0]


TUPLE_MODEL = '''
from collections import namedtuple
from dataclasses import dataclass

from torch import nn

from wmbench.models import Model
from wmbench.registry import MODELS

Out = namedtuple("Out", "logits aux")


class AuxNet(nn.Module):
    def __init__(self, data):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(data.train_x[0].numel(), 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, data.num_classes)
        self.aux = nn.Linear(16, data.num_classes)  # defined last, run only in training

    def forward(self, x):
        h = self.body(x)
        return Out(self.head(h), self.aux(h)) if self.training else self.head(h)


@MODELS.register("aux_net")
@dataclass(frozen=True)
class AuxNetModel(Model):
    def build(self, data):
        return AuxNet(data)
'''


WIDE_MODEL = '''
from dataclasses import dataclass
from torch import nn
from wmbench.models import Model
from wmbench.registry import MODELS


@MODELS.register("wide_net")
@dataclass(frozen=True)
class WideNet(Model):
    def build(self, data):
        return nn.Sequential(nn.Flatten(), nn.Linear(data.train_x[0].numel(), data.num_classes + 5))
'''


@pytest.mark.parametrize("source,model,message", [
    (TUPLE_MODEL, "aux_net", "in train mode the model returns Out, not a tensor of logits"),
    # 15 logits on 10 classes trained and scored silently (the argmax may pick a class the data lacks)
    (WIDE_MODEL, "wide_net", "in train mode the model returns outputs of shape (2, 15), not 10 logits per example"),
])
def test_a_model_whose_train_mode_output_is_no_logits_per_class_is_refused_before_training(tmp_path, capsys, source, model, message):
    plugin = tmp_path / f"{model}.py"
    plugin.write_text(source)
    path = plugin_scenario(tmp_path, plugin, "uchida", name=model, models=model)
    assert main(["run", str(path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_the_train_mode_check_leaves_no_trace(digits):
    """Buffers and the random state as they were: the training after it is unchanged."""
    import torch

    from wmbench.registry import MODELS
    from wmbench.model_checks import mode_output

    model = MODELS.build("small_cnn").build(digits)
    torch.manual_seed(3)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    state = torch.random.get_rng_state()
    assert mode_output(model, digits, True) is None and mode_output(model, digits, False) is None
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())


def test_deepsigns_probes_the_classifier_that_eval_runs(tmp_path, digits):
    from wmbench.methods.deepsigns import default_probe
    from wmbench.registry import load_plugins, MODELS

    (tmp_path / "aux2.py").write_text(TUPLE_MODEL.replace('"aux_net"', '"aux_net2"'))
    load_plugins(["aux2.py"], tmp_path)
    model = MODELS.build("aux_net2").build(digits)
    assert default_probe(model, digits.train_x[:2]) == "head"


def test_legitimate_overrides_pass_the_signature_check():
    """Extra optional parameters, *args/**kwargs, a staticmethod, a decorated method: all callable as
    wmbench calls them."""
    import functools
    from dataclasses import dataclass

    from wmbench.methods.watermas import WaterMAS
    from wmbench.registry import METHODS

    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @METHODS.register("fine_overrides")
    @dataclass(frozen=True)
    class FineOverrides(WaterMAS):
        def detect(self, model, key, verbose=False):
            return super().detect(model, key)

        def extract(self, *args, **kwargs):
            return super().extract(*args, **kwargs)

        @staticmethod
        def carriers(key):
            return {}

        @logged
        def keygen(self, model, data, rng):
            return super().keygen(model, data, rng)

    assert "fine_overrides" in METHODS.names()


def test_unwrapping_refuses_to_choose_among_several_fitting_submodules():
    """A wrapper holding two copies of the watermarked layout: no copy is chosen (the choice followed
    set order, so the verdict could change from one process to the next)."""
    import torch
    from torch import nn

    from wmbench.detection import unwrapped

    def block() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    carriers = {"0.weight": torch.tensor([0, 3]), "2.weight": torch.tensor([1])}
    one = nn.ModuleDict({"ab": block()})
    inner, note = unwrapped(one, carriers)
    assert inner is one["ab"] and "found under 'ab'" in note
    two = nn.ModuleDict({"ab": block(), "cd": block()})
    inner, note = unwrapped(two, carriers)
    assert inner is two and "fit under 2 prefixes" in note
    small = nn.ModuleDict({"ab": block(), "cd": nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))})
    assert unwrapped(small, carriers)[0] is small["ab"]  # carrier positions outside cd's tensors


def test_a_plugin_registering_through_a_module_it_imports_is_not_called_silent(tmp_path, capsys):
    (tmp_path / "helper_attacks_mod.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from wmbench.api import Attack
        from wmbench.registry import ATTACKS

        @ATTACKS.register("helper_noop")
        @dataclass(frozen=True)
        class HelperNoop(Attack):
            def attack(self, model, strength, ctx):
                return model
    '''))
    (tmp_path / "entry.py").write_text("import sys, pathlib\nsys.path.insert(0, str(pathlib.Path(__file__).parent))\nimport helper_attacks_mod  # noqa: F401\n")
    path = plugin_scenario(tmp_path, tmp_path / "entry.py", "uchida", "{name: helper_nop, strengths: [1.0]}", name="entry")
    assert main(["run", str(path), "--dry-run", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "did you mean: helper_noop" in err and "registered nothing" not in err, err
