"""The suspect files a model owner is really handed, given to `wmbench detect`: each is read as the
owner's own safetensors file reads (up to a lower precision's rounding), or refused with one line
and exit 2; never read silently wrong, never unpickled."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
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


class Evil:
    """Unpickling this would create a file: proof that a pickle was (never) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


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


def _torchscript(state: dict, path: Path) -> None:
    from wmbench.registry import MODELS

    model = MODELS.build("small_cnn", {"width": 8, "hidden": 16}).build(_shape_only())
    model.load_state_dict(state)
    with warnings.catch_warnings():  # torch.jit.script is deprecated: a suspect may still be one
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))


def _shape_only():
    from wmbench.data import DataBundle

    images, labels = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)
    return DataBundle("digits", images, labels, images, labels, 10)


# form -> (how the file is written from the owner's state dict, the words its refusal must name)
FOREIGN = {
    "torch.save(state_dict)": (lambda st, p: torch.save(st, p), "a PyTorch checkpoint written by torch.save"),
    "torch.save(checkpoint)": (lambda st, p: torch.save({"state_dict": st, "epoch": 3}, p), "a PyTorch checkpoint written by torch.save"),
    "torch.save legacy": (lambda st, p: torch.save(st, p, _use_new_zipfile_serialization=False), "a pickle (torch.save's legacy format"),
    "torch.save(tensor)": (lambda st, p: torch.save(st["0.weight"], p), "a PyTorch checkpoint written by torch.save"),
    "evil pickle": (lambda st, p: p.write_bytes(pickle.dumps({"0.weight": Evil(p.parent / "PWNED")})), "a pickle (torch.save's legacy format"),
    "evil torch.save": (lambda st, p: torch.save({"0.weight": Evil(p.parent / "PWNED")}, p), "a PyTorch checkpoint written by torch.save"),
    "TorchScript": (_torchscript, "a TorchScript archive (torch.jit.save)"),
    "empty file": (lambda st, p: p.write_bytes(b""), "an empty file"),
    "truncated": (lambda st, p: save_file(st, str(p)) or p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "a truncated safetensors file"),
    "truncated header": (lambda st, p: save_file(st, str(p)) or p.write_bytes(p.read_bytes()[:20]), "a truncated safetensors file"),
}


@pytest.mark.parametrize("form", list(FOREIGN))
def test_a_file_safetensors_cannot_read_is_named_in_one_line_and_never_unpickled(owner, tmp_path, capsys, form):
    """Every one of these read "not a safetensors model file (Error while deserializing header:
    header too large)": true, but no help to an owner handed a .pt file."""
    write, words = FOREIGN[form]
    write(load_file(str(owner / "wm.safetensors")), tmp_path / "suspect.pt")
    err = refused(capsys, tmp_path / "suspect.pt", owner / "wm.key")
    assert words in err, err
    if "pickle" in words or "torch.save" in words or "TorchScript" in words:
        assert "never loads" in err and "convert its state dict to safetensors" in err, err
    assert not (tmp_path / "PWNED").exists()


def test_lower_precision_and_converted_files_read_the_owners_verdict(owner, tmp_path, capsys):
    """float16 / bfloat16 files (and a model.half()'s, without its BatchNorm counters) are cast to the
    architecture's float32: the statistic moves by the rounding only, the verdict not at all."""
    state, key = load_file(str(owner / "wm.safetensors")), owner / "wm.key"
    own = verdict(capsys, owner / "wm.safetensors", key)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if not k.endswith("num_batches_tracked")},
                  str(tmp_path / "low.safetensors"))
        read = verdict(capsys, tmp_path / "low.safetensors", key)
        assert read["detected"] and read["statistic"] == pytest.approx(own["statistic"], abs=1e-5), (dtype, read, own)


def test_a_suspects_floats_are_checked_as_the_architecture_reads_them(owner, tmp_path, capsys):
    """A float8 file (torch has no isfinite for it) raised a NotImplementedError traceback; a float64
    weight of 1e300, finite in the file, became an infinity in the float32 model and was read as a verdict."""
    state, key = load_file(str(owner / "wm.safetensors")), owner / "wm.key"
    save_file({k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}, str(tmp_path / "fp8.safetensors"))
    assert verdict(capsys, tmp_path / "fp8.safetensors", key)["detected"]  # 3 bits of mantissa: the mark still reads
    huge = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    huge["3.weight"][0, 0, 0, 0] = 1e300
    save_file(huge, str(tmp_path / "huge.safetensors"))
    assert "3.weight holds NaN or infinite values (its torch.float64 read as torch.float32)" in refused(capsys, tmp_path / "huge.safetensors", key)


def test_a_prefix_only_some_names_carry_is_refused_with_a_hint(owner, tmp_path, capsys):
    """Which names are the model's is ambiguous (a wrapper holding a loss's weights beside the
    network, a file holding the model twice): refused, and the line says why the names differ."""
    state, key = load_file(str(owner / "wm.safetensors")), owner / "wm.key"
    for label, mixed in {
        "lightning with a loss": {**{f"model.{k}": v for k, v in state.items()}, "criterion.weight": state["0.weight"].clone()},
        "twice": {**{f"module.{k}": v.clone() for k, v in state.items()}, **state},
    }.items():
        save_file(mixed, str(tmp_path / "mixed.safetensors"))
        err = refused(capsys, tmp_path / "mixed.safetensors", key)
        assert "is the architecture's 0.weight under " in err and "a prefix not every name in the file carries" in err, (label, err)


@pytest.mark.parametrize("length", [640, 896, 1152, 1408, 1096])
def test_a_truncated_safetensors_file_is_not_named_a_pickle_by_its_header_length(tmp_path, length):
    """A safetensors file starts with its header's length, 8 bytes little-endian: 640 bytes (0x280)
    start it with 0x80 0x02, a pickle's first two bytes, and a truncated small model's file was
    named "a pickle (torch.save's legacy format ...)", which it is not (any length whose low two
    bytes are 0x0280-0x0580)."""
    from wmbench.foreign_format import foreign_format

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    whole = length.to_bytes(8, "little") + header.ljust(length) + bytes(16)
    (tmp_path / "ok.safetensors").write_bytes(whole)
    assert load_file(str(tmp_path / "ok.safetensors"))["w"].shape == (4,)  # a valid file whole
    for cut in (8 + length - 5, len(whole) - 4):  # its header cut short, its tensors cut short
        (tmp_path / "cut.safetensors").write_bytes(whole[:cut])
        assert foreign_format(tmp_path / "cut.safetensors").startswith("a truncated safetensors file"), cut
