"""The suspect files a model owner is really handed, given to `wmbench detect`: each is read as the
owner's own safetensors file reads (up to a lower precision's rounding), or refused with one line
and exit 2; never read silently wrong, never unpickled."""

from __future__ import annotations

import json

import pytest
from conftest import plugin_scenario
from safetensors.torch import load_file, save_file

from wmbench.cli import main

pytestmark = pytest.mark.at_chance("plumbing: whether a suspect file is read, not how strong its mark is")

# The architecture's own names start with `module.`, as a plug-in wrapping its network in an
# attribute `module` does: a DataParallel prefix must not be stripped from them.
WRAPPED = '''
from dataclasses import dataclass

from torch import nn

from wmbench.models import Model
from wmbench.registry import MODELS


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, x):
        return self.module(x)


@MODELS.register("wrapped_cnn")
@dataclass(frozen=True)
class Wrapped(Model):
    """small_cnn held as the attribute `module`."""

    def build(self, data):
        return Outer(MODELS.build("small_cnn", {"width": 8, "hidden": 16}).build(data))
'''


SCENARIO = """
name: owner
seeds: [0]
device: cpu
datasets: [digits]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods: [{name: watermas, args: {n_carriers: 256}}]
training: {epochs: 2}
"""


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """An embedded model (``wm.safetensors``) and its key (``wm.key``); ``state``: the model's tensors."""
    d = tmp_path_factory.mktemp("owner")
    (d / "s.yaml").write_text(SCENARIO)
    assert main(["embed", str(d / "s.yaml"), "--cache", str(d / "cache"), "-q", "--out-model", str(d / "wm.safetensors"), "--out-key", str(d / "wm.key")]) == 0
    return d


def refused(capsys, model, key) -> str:
    """The one line detect refuses ``model`` with (exit 2)."""
    capsys.readouterr()
    assert main(["detect", "--model", str(model), "--key", str(key)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmbench: error: ") and len(err.splitlines()) == 1, err
    return err


def verdict(capsys, model, key) -> dict:
    capsys.readouterr()
    assert main(["detect", "--model", str(model), "--key", str(key), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_an_architecture_whose_own_names_start_with_module_is_embedded_and_detected(tmp_path, capsys):
    """Its names were stripped of `module.` before they were compared with the architecture's:
    embed trained, then refused its own model and deleted it."""
    (tmp_path / "wrapped.py").write_text(WRAPPED)
    path = plugin_scenario(tmp_path, tmp_path / "wrapped.py", "{name: watermas, args: {n_carriers: 128}}", models="wrapped_cnn")
    out = ["--out-model", str(tmp_path / "m.safetensors"), "--out-key", str(tmp_path / "m.key")]
    assert main(["embed", str(path), "--cache", str(tmp_path / "cache"), "-q", *out]) == 0, capsys.readouterr().err
    state = load_file(str(tmp_path / "m.safetensors"))
    assert all(k.startswith("module.") for k in state)
    own = verdict(capsys, tmp_path / "m.safetensors", tmp_path / "m.key")
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "dp.safetensors"))  # the plug-in under DataParallel
    assert verdict(capsys, tmp_path / "dp.safetensors", tmp_path / "m.key") == own and own["detected"]



def test_a_training_wrappers_common_path_is_removed_only_where_it_gives_the_architectures_names(owner, tmp_path, capsys):
    """Lightning keeps the network as ``self.model``: its weights are saved as ``model.0.weight``.
    Such a file was refused ("the model lacks 0.weight ...")."""
    state, key = load_file(str(owner / "wm.safetensors")), owner / "wm.key"
    own = verdict(capsys, owner / "wm.safetensors", key)
    for prefix in ("model.", "module.model.", "model._orig_mod.", "net.backbone."):
        save_file({f"{prefix}{k}": v for k, v in state.items()}, str(tmp_path / "p.safetensors"))
        assert verdict(capsys, tmp_path / "p.safetensors", key) == own, prefix
    # a wrapper holding more than the network (a loss's weights too): not all names are the network's
    save_file({**{f"model.{k}": v for k, v in state.items()}, "criterion.weight": state["0.weight"].clone()}, str(tmp_path / "more.safetensors"))
    assert "the key's architecture lacks" in refused(capsys, tmp_path / "more.safetensors", key)
    # a common path that leaves a tensor out: reported against the file's own names, not read
    save_file({f"model.{k}": v for k, v in state.items() if k != "8.bias"}, str(tmp_path / "less.safetensors"))
    assert "the model lacks 0.weight" in refused(capsys, tmp_path / "less.safetensors", key)
