"""Plug-in methods unlike the built-ins, second probe (an ML-security researcher's, 2026-12-06): a
detector that hands back a verdict where the p-value goes, keys holding what safetensors cannot
store, an embed that trains in another precision or trains a copy. Each row says what was measured,
or the method is refused in one line; no inverted figure is published."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import plugin_scenario, run_scenario

from wmbench.api import Detection

FOREIGN = '''
import copy
from dataclasses import dataclass

import torch

from wmbench.api import Detection
from wmbench.methods.uchida import Uchida
from wmbench.registry import METHODS


@METHODS.register("verdict_as_p")
@dataclass(frozen=True)
class VerdictAsP(Uchida):
    """Hands back its verdict (a bool) where the p-value goes."""

    def detect(self, model, key):
        d = super().detect(model, key)
        return Detection(d.stat, d.pvalue < 0.01)


@METHODS.register("labels_in_tensors")
@dataclass(frozen=True)
class LabelsInTensors(Uchida):
    """Keeps a dict of strings among key.tensors, added after training."""

    def finalize_key(self, model, key):
        key.tensors["labels"] = {"a": "x"}
        return key


@METHODS.register("array_in_tensors")
@dataclass(frozen=True)
class ArrayInTensors(Uchida):
    """Keeps a numpy copy of its bits among key.tensors, from keygen."""

    def keygen(self, model, data, rng):
        key = super().keygen(model, data, rng)
        key.tensors["bits_np"] = key.tensors["bits"].numpy().copy()
        return key


@METHODS.register("generator_in_meta")
@dataclass(frozen=True)
class GeneratorInMeta(Uchida):
    """Puts a generator object in key.meta after training (the pre-flight sees keygen's key only)."""

    def finalize_key(self, model, key):
        key.meta["stream"] = (i for i in range(3))
        return key


@METHODS.register("one_tensor_twice")
@dataclass(frozen=True)
class OneTensorTwice(Uchida):
    """Stores one tensor under two names (an alias the detector reads)."""

    def finalize_key(self, model, key):
        key.tensors["bits_again"] = key.tensors["bits"]
        return key


@METHODS.register("trains_in_float64")
@dataclass(frozen=True)
class TrainsInFloat64(Uchida):
    """Trains (and leaves) the model in float64, casting each batch."""

    def embed(self, model, trainer, rng):
        model.double()
        key = self.keygen(model, trainer.data, rng)
        step = self.step_fn(model, key)
        trainer.fit(model, lambda m, batch, loss_fn, opt: step(m, (batch[0].double(), batch[1]), loss_fn, opt))
        return self.finalize_key(model, key)


@METHODS.register("trains_a_copy")
@dataclass(frozen=True)
class TrainsACopy(Uchida):
    """Trains a deep copy of the model it is given, which it leaves as built."""

    def embed(self, model, trainer, rng):
        return super().embed(copy.deepcopy(model), trainer, rng)
'''


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    plugin = tmp_path_factory.mktemp("foreign") / "foreign.py"
    plugin.write_text(FOREIGN)
    return plugin


@pytest.mark.parametrize("stat, pvalue", [(0.9, True), (0.9, False), (0.9, np.bool_(False)), (0.9, torch.tensor(False)),
                                          (True, 0.01), (np.bool_(True), 0.01), (torch.tensor(True), 0.01)])
def test_a_detection_refuses_a_bool_for_a_number(stat, pvalue):
    """``Detection(stat, pvalue < 0.01)``: the verdict True read p = 1 (not detected) and False p = 0
    (detected): every row and the null's FPR (32/33) inverted, nothing said."""
    with pytest.raises(TypeError, match="a bool, not a number"):
        Detection(stat, pvalue)


def test_a_detection_takes_a_tensor_that_requires_grad_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = Detection(torch.tensor(0.8, requires_grad=True), torch.tensor([0.01], dtype=torch.float64))
    assert d.stat == pytest.approx(0.8) and d.pvalue == 0.01


def test_a_verdict_handed_back_as_the_p_value_fails_every_cell(tmp_path, foreign):
    path = plugin_scenario(tmp_path, foreign, "verdict_as_p", epochs=2, name="verdict")
    code, frame = run_scenario(path, tmp_path / "c")
    assert frame["detected"].isna().all() and frame["detect_pvalue"].isna().all(), frame[["detect_pvalue", "detected"]]
    assert frame["failure"].str.contains("detect: TypeError: Detection p-value is a bool, not a number").all(), frame["failure"].tolist()


@pytest.mark.parametrize("value, why", [
    ({"a": "x"}, r"key.tensors\['v'\] is a dict, not a torch.Tensor"),
    (np.arange(3), r"key.tensors\['v'\] is a numpy.ndarray, not a torch.Tensor.*torch.from_numpy"),
    (torch.eye(2).to_sparse(), r"key.tensors\['v'\] is a sparse tensor.*to_dense"),
])
def test_a_key_holding_what_safetensors_cannot_store_is_refused_naming_the_entry(tmp_path, value, why):
    from wmbench.api import Key
    from wmbench.errors import WmbenchError

    with pytest.raises(WmbenchError, match=r"the key of method 'm' cannot be stored: " + why):
        Key("m", {"v": value}).save(tmp_path / "k")
    with pytest.raises(WmbenchError, match=r"key.meta cannot be written as JSON .*generator"):
        Key("m", {}, {"g": (i for i in range(2))}).save(tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_a_key_holding_one_tensor_under_two_names_is_stored():
    """safetensors refuses tensors sharing memory: such a key failed after its whole training
    ('Some tensors share memory')."""
    import tempfile
    from pathlib import Path

    from wmbench.api import Key

    bits = torch.arange(4)
    with tempfile.TemporaryDirectory() as folder:
        Key("m", {"a": bits, "b": bits, "c": bits[:2]}).save(Path(folder) / "k")
        back = Key.load(Path(folder) / "k").tensors
    assert torch.equal(back["a"], bits) and torch.equal(back["b"], bits) and torch.equal(back["c"], bits[:2])


def test_key_contents_are_checked_before_training_or_fail_their_cells_in_one_line(tmp_path, foreign, capsys):
    """A numpy array in keygen's key.tensors stopped nothing before the training and failed each cell
    after it with "AttributeError: 'numpy.ndarray' object has no attribute 'detach'"; a dict in
    finalize_key's with "'dict' object has no attribute 'detach'"; a generator in its key.meta with
    "Object of type generator is not JSON serializable", naming neither the key nor the entry."""
    from wmbench.cli import main

    path = plugin_scenario(tmp_path, foreign, "array_in_tensors", epochs=50, name="early")
    assert main(["run", str(path), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "ArrayInTensors.keygen's key.tensors['bits_np'] is a numpy.ndarray, not a torch.Tensor" in err, err
    path = plugin_scenario(tmp_path, foreign, "labels_in_tensors, generator_in_meta, one_tensor_twice", epochs=2, name="late")
    code, frame = run_scenario(path, tmp_path / "c")
    failure = frame.set_index("method")["failure"]
    assert failure["labels_in_tensors"].str.contains(r"training: \S*: the key of method 'labels_in_tensors' cannot be stored: key.tensors\['labels'\] is a dict").all(), failure.tolist()
    assert failure["generator_in_meta"].str.contains("cannot be stored: key.meta cannot be written as JSON").all(), failure.tolist()
    assert failure["one_tensor_twice"].isna().all(), failure.tolist()


def test_embed_refuses_a_key_it_cannot_store_in_one_line(tmp_path, foreign, capsys):
    """``wmbench embed`` ended in a traceback (AttributeError from Key.save); now one line, exit 2, no file."""
    from wmbench.cli import main

    path = plugin_scenario(tmp_path, foreign, "labels_in_tensors", epochs=2, name="owned")
    files = ["--out-model", str(tmp_path / "m.safetensors"), "--out-key", str(tmp_path / "m.key")]
    capsys.readouterr()
    assert main(["embed", str(path), "--cache", str(tmp_path / "c"), "-q", *files]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmbench: error: ") and "key.tensors['labels'] is a dict, not a torch.Tensor" in err, err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.key").exists()


def test_an_embed_that_leaves_the_model_in_another_precision_is_measured_at_the_built_one(tmp_path, foreign):
    """A method training in float64 failed every cell with "training: RuntimeError: Input type
    (torch.FloatTensor) and weight type (torch.DoubleTensor) should be the same" (wmbench's own
    evaluation of the trained model), naming neither the method nor the precision. The trained
    model is stored and read back at the precision it was built in anyway: it is cast back there
    at once, and each row says so."""
    path = plugin_scenario(tmp_path, foreign, "trains_in_float64, uchida", epochs=2, name="f64")
    code, frame = run_scenario(path, tmp_path / "c")
    assert frame["failure"].isna().all(), frame["failure"].tolist()
    notes = frame.set_index("method")["detect_note"].fillna("")
    assert notes["trains_in_float64"].str.contains("TrainsInFloat64.embed returned float64 weights: stored and evaluated in float32").all(), notes.tolist()
    assert not notes["uchida"].str.contains("embed returned").any()
    assert frame["detected"].notna().all()


def test_an_embed_that_trains_a_copy_fails_its_training_saying_so(tmp_path, foreign):
    """The untrained model was stored and measured: rows of 95% error, bit accuracy 0.60 "not
    detected", whose only note was the clean model's chance accuracy."""
    path = plugin_scenario(tmp_path, foreign, "trains_a_copy, uchida", epochs=2, name="copy")
    code, frame = run_scenario(path, tmp_path / "c")
    failure = frame.set_index("method")["failure"]
    assert failure["trains_a_copy"].str.contains(
        "training: WmbenchError: TrainsACopy.embed left the model it was given as built: no weight or buffer changed").all(), failure.tolist()
    assert failure["uchida"].isna().all()
