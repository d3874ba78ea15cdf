"""`wmbench embed` writes a watermarked model and its key; `wmbench detect` finds the mark in it
(also after a rescaling, with --align), not in an unwatermarked model of the same architecture."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from wmbench.api import AttackContext, Key
from wmbench.cli import main
from wmbench.registry import ATTACKS, DATASETS, MODELS
from wmbench.train import Trainer

SCENARIO = """
name: owner
seeds: [0]
device: cpu
datasets: [digits]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods: [none, {name: watermas, args: {n_carriers: 256}}]
training: {epochs: 3}
"""


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    d = tmp_path_factory.mktemp("owner")
    (d / "s.yaml").write_text(SCENARIO)
    base = ["embed", str(d / "s.yaml"), "--cache", str(d / "cache"), "-q"]
    assert main([*base, "--out-model", str(d / "wm.safetensors"), "--out-key", str(d / "wm.key")]) == 0
    assert main([*base, "--method", "none", "--out-model", str(d / "plain.safetensors"), "--out-key", str(d / "plain.key")]) == 0
    return d


def detect(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["detect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_embed_writes_a_safetensors_model_and_a_private_key_naming_its_architecture(owner):
    assert (owner / "wm.key").stat().st_mode & 0o777 == 0o600
    key = Key.load(owner / "wm.key")
    assert key.meta["model"] == {"name": "small_cnn", "version": "1", "args": {"width": 8, "hidden": 16}}
    assert key.meta["data"] == {"name": "digits", "num_classes": 10, "in_channels": 1, "image_size": [8, 8], "task": "classification"}
    assert key.meta["method"]["name"] == "watermas" and key.meta["method"]["detect"] == {"align": False}
    assert set(load_file(str(owner / "wm.safetensors"))) >= {"0.weight", "8.weight"}


def test_detect_prints_method_statistic_pvalue_and_verdict(owner, capsys):
    assert main(["detect", "--model", str(owner / "wm.safetensors"), "--key", str(owner / "wm.key")]) == 0
    out = capsys.readouterr().out
    assert "method:    watermas" in out and "statistic:" in out and "p-value:" in out
    assert "verdict:   watermark detected" in out
    assert re.search(r"p-value:   \S+ \(log10 -\d+\.\d\)", out)  # the log10 stays finite where the p-value underflows
    found = detect(capsys, "--model", str(owner / "wm.safetensors"), "--key", str(owner / "wm.key"))
    assert found["log10_p_value"] < -6 and math.isfinite(found["log10_p_value"])
    result = detect(capsys, "--model", str(owner / "plain.safetensors"), "--key", str(owner / "wm.key"))
    assert result["method"] == "watermas" and not result["detected"] and result["p_value"] > 1e-3
    assert result["log10_p_value"] == pytest.approx(math.log10(result["p_value"]), rel=1e-6)


def test_a_model_file_given_as_the_key_says_so(owner, capsys):
    assert main(["detect", "--model", str(owner / "wm.key"), "--key", str(owner / "wm.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a wmbench key file" in err and "a model file?" in err


def test_align_reads_the_mark_through_a_rescaling(owner, tmp_path, capsys):
    data = DATASETS.build("digits").load(None)
    model = MODELS.build("small_cnn", {"width": 8, "hidden": 16}).build(data)
    model.load_state_dict(load_file(str(owner / "wm.safetensors")))
    ctx = AttackContext(data, torch.Generator().manual_seed(0), torch.device("cpu"))
    scaled = ATTACKS.build("scale").apply(model, 3.0, ctx)
    # a torchvision-style state dict as saved from DataParallel: names prefixed with "module."
    save_file({f"module.{k}": v.contiguous() for k, v in scaled.state_dict().items()}, str(tmp_path / "stolen.safetensors"))
    plain = detect(capsys, "--model", str(tmp_path / "stolen.safetensors"), "--key", str(owner / "wm.key"))
    aligned = detect(capsys, "--model", str(tmp_path / "stolen.safetensors"), "--key", str(owner / "wm.key"), "--align")
    assert aligned["align"] and not plain["align"]
    assert aligned["detected"] and aligned["statistic"] > 0.999 > plain["statistic"]


def test_two_embeds_draw_different_secret_keys_each_detecting_only_its_own_model(owner, capsys):
    args = ["embed", str(owner / "s.yaml"), "--cache", str(owner / "cache"), "-q"]
    assert main([*args, "--out-model", str(owner / "wm2.safetensors"), "--out-key", str(owner / "wm2.key")]) == 0
    first, second = Key.load(owner / "wm.key"), Key.load(owner / "wm2.key")
    assert first.meta["key_source"] == second.meta["key_source"] == "os_random"
    assert not torch.equal(first.tensors["flat_idx"], second.tensors["flat_idx"])
    assert not (owner / "cache" / "models").exists() or not any((owner / "cache" / "models").iterdir())  # secrets not cached
    for own, other in (("wm", "wm2"), ("wm2", "wm")):
        assert detect(capsys, "--model", str(owner / f"{own}.safetensors"), "--key", str(owner / f"{own}.key"))["detected"]
        assert detect(capsys, "--model", str(owner / f"{other}.safetensors"), "--key", str(owner / f"{own}.key"))["p_value"] > 1e-3


def test_reproducible_seed_gives_the_same_key_and_reuses_its_cached_training(owner, monkeypatch):
    args = ["embed", str(owner / "s.yaml"), "--cache", str(owner / "cache"), "-q", "--reproducible-seed", "7"]
    assert main([*args, "--out-model", str(owner / "r1.safetensors"), "--out-key", str(owner / "r1.key")]) == 0
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained again"))
    assert main([*args, "--out-model", str(owner / "r2.safetensors"), "--out-key", str(owner / "r2.key")]) == 0
    assert (owner / "r1.safetensors").read_bytes() == (owner / "r2.safetensors").read_bytes()
    first, second = Key.load(owner / "r1.key"), Key.load(owner / "r2.key")
    assert first.meta["key_source"] == {"reproducible_seed": 7}
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)


def test_resync_reads_the_mark_through_dummy_units_and_permutation(owner, tmp_path, capsys):
    data = DATASETS.build("digits").load(None)
    model = MODELS.build("small_cnn", {"width": 8, "hidden": 16}).build(data)
    model.load_state_dict(load_file(str(owner / "wm.safetensors")))
    ctx = AttackContext(data, torch.Generator().manual_seed(0), torch.device("cpu"))
    stolen = ATTACKS.build("dummy_neurons").apply(model, 0.5, ctx)
    save_file({k: v.contiguous() for k, v in stolen.state_dict().items()}, str(tmp_path / "stolen.safetensors"))
    args = ["--model", str(tmp_path / "stolen.safetensors"), "--key", str(owner / "wm.key")]
    assert main(["detect", *args]) == 2  # plainly, the shapes no longer fit the key
    err = capsys.readouterr().err
    assert "shapes differ" in err and "--resync --reference" in err  # it says what reads a grown model
    synced = detect(capsys, *args, "--resync", "--reference", str(owner / "wm.safetensors"))
    assert synced["resync"] and synced["detected"] and synced["statistic"] > 0.999
    clean = detect(capsys, "--model", str(owner / "plain.safetensors"), "--key", str(owner / "wm.key"), "--resync", "--reference", str(owner / "wm.safetensors"))
    assert not clean["detected"]
    assert main(["detect", *args, "--resync"]) == 2  # --resync without --reference


def test_embed_says_whether_its_own_model_passes_the_scenarios_threshold(owner, tmp_path, capsys, monkeypatch):
    import wmbench.ownership as ownership

    args = ["embed", str(owner / "s.yaml"), "--cache", str(owner / "cache"), "-q", "--out-model", str(tmp_path / "m"), "--out-key", str(tmp_path / "k")]
    assert main([*args, "--set", "detection.threshold=1e-9"]) == 0
    captured = capsys.readouterr()
    assert "on the written model: detected at the scenario's threshold 1e-09" in captured.out and "warning" not in captured.err
    # a mark too weak to pass: said on stdout, and a warning not to rely on the key
    real = ownership.detect
    monkeypatch.setattr(ownership, "detect", lambda *a, **k: dataclasses.replace(real(*a, **k), pvalue=0.01))
    assert main([*args, "--force"]) == 0
    captured = capsys.readouterr()
    assert "p-value 0.01 on the written model: NOT detected at the scenario's threshold 1e-06" in captured.out
    assert "warning: the mark is not detectable in the model just written" in captured.err
    assert "a model trained too little, or a method too weak for it" in captured.err
    # at its statistic's maximum the cause is the key's size, not the training: the warning says so
    monkeypatch.setattr(ownership, "detect", lambda *a, **k: dataclasses.replace(real(*a, **k), stat=1.0, pvalue=0.01))
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert "warning: the mark is not detectable in the model just written (Pearson r 1 is the most it can read, yet p = 0.01 is not below the threshold 1e-06: " \
        "this key cannot be detected at this threshold (too few bits for it))" in err, err


def test_detect_refuses_files_it_cannot_read_a_verdict_from(owner, tmp_path, capsys):
    wm = load_file(str(owner / "wm.safetensors"))
    args = ["--key", str(owner / "wm.key")]
    first = next(k for k, v in wm.items() if v.is_floating_point())
    for label, state in {
        "int8": {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in wm.items()},
        "nan": {**wm, first: torch.full_like(wm[first], float("nan"))},
    }.items():
        save_file(state, str(tmp_path / f"{label}.safetensors"))
        assert main(["detect", "--model", str(tmp_path / f"{label}.safetensors"), *args]) == 2
        assert ("not a float model file" if label == "int8" else "NaN or infinite") in capsys.readouterr().err
    assert main(["detect", "--model", str(owner / "wm.safetensors"), *args, "--reference", str(owner / "wm.safetensors")]) == 2
    assert "--reference is read only with --resync" in capsys.readouterr().err


def test_an_untrusted_keys_input_shape_and_carriers_are_bounded(owner, tmp_path, capsys):
    key = Key.load(owner / "wm.key")
    huge = dataclasses.replace(key, meta={**key.meta, "data": {**key.meta["data"], "image_size": [10**9, 10**9]}})
    huge.save(tmp_path / "huge.key")
    args = ["--model", str(owner / "wm.safetensors"), "--resync", "--reference", str(owner / "wm.safetensors")]
    assert main(["detect", *args, "--key", str(tmp_path / "huge.key")]) == 2  # not an 8 EB allocation
    assert "malformed key (input shape" in capsys.readouterr().err
    empty = dataclasses.replace(key, tensors={k: v[:0] for k, v in key.tensors.items()})
    empty.save(tmp_path / "empty.key")
    assert main(["detect", "--model", str(owner / "wm.safetensors"), "--key", str(tmp_path / "empty.key")]) == 2
    assert "malformed key" in capsys.readouterr().err


def test_resyncs_example_input_checks_the_data_record_by_the_one_rule(tmp_path):
    """``_example_input`` reads the record as the architecture's build does
    (``key_record.data_record_problem``): a record the build would refuse (no class count, a float
    channel count) is refused here too, in the same words; the size bound stays its own."""
    from wmbench.errors import WmbenchError
    from wmbench.key_record import data_record_problem
    from wmbench.ownership import MAX_EXAMPLE_VALUES, _example_input

    good = {"name": "digits", "num_classes": 10, "in_channels": 1, "image_size": [8, 8]}
    assert _example_input(good, tmp_path / "k").shape == (2, 1, 8, 8)
    for bad in ({**good, "num_classes": 0}, {**good, "in_channels": 1.0}, {**good, "image_size": [8, True]}):
        with pytest.raises(WmbenchError) as caught:
            _example_input(bad, tmp_path / "k")
        assert str(caught.value) == f"{tmp_path / 'k'}: malformed data record in the key ({data_record_problem(bad)})"
    with pytest.raises(WmbenchError, match=rf"malformed key \(input shape 1 x \[4097, 4097\]: at most {MAX_EXAMPLE_VALUES} values"):
        _example_input({**good, "image_size": [4097, 4097]}, tmp_path / "k")


def test_detect_resync_reads_carriers_once_by_check_keys_policy(owner, monkeypatch, capsys):
    """``detect --resync`` leaves out of its matching the carriers ``check_key`` read and checked:
    a method without carriers() (NotImplementedError: optional for a plug-in) is resynchronised
    with none, as in the grid (it was "--resync: cannot match the suspect's units"); a carriers()
    that fails otherwise makes the key malformed in one line (an AttributeError was a traceback)."""
    from wmbench.methods.watermas import WaterMAS

    args = ["detect", "--model", str(owner / "wm.safetensors"), "--key", str(owner / "wm.key"),
            "--resync", "--reference", str(owner / "wm.safetensors")]
    real, calls = WaterMAS.carriers, []

    def counted(self, key):
        calls.append(1)
        return real(self, key)

    monkeypatch.setattr(WaterMAS, "carriers", counted)
    assert main(args) == 0 and "watermark detected" in capsys.readouterr().out
    assert len(calls) == 1  # read once, by check_key

    def unimplemented(self, key):
        raise NotImplementedError

    monkeypatch.setattr(WaterMAS, "carriers", unimplemented)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "(resynchronised)" in captured.out and "watermark detected" in captured.out, captured.err

    def broken(self, key):
        raise AttributeError("no such field")

    monkeypatch.setattr(WaterMAS, "carriers", broken)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed key for method watermas (carriers() raised AttributeError: no such field)" in err, err


@pytest.mark.at_chance("plumbing: embed draws a fresh seed and trains one epoch; the test checks that a key with NaN channel records is read")
def test_a_tartaglione_key_with_carriers_in_biases_is_read_by_detect(tmp_path, capsys):
    """Its channel records are NaN for carriers in 1-D tensors by design: detect refused every
    default Tartaglione key as "non-finite", and embed left the unreadable pair behind."""
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("methods: [none, {name: watermas, args: {n_carriers: 256}}]", "methods: [tartaglione]").replace("epochs: 3", "epochs: 1"))
    files = ["--out-model", str(tmp_path / "t.safetensors"), "--out-key", str(tmp_path / "t.key")]
    assert main(["embed", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "-q", *files]) == 0
    assert Key.load(tmp_path / "t.key").tensors["channel_norm"].isnan().any()  # the case in question
    verdict = detect(capsys, "--model", str(tmp_path / "t.safetensors"), "--key", str(tmp_path / "t.key"))
    assert verdict["detected"]


def test_embed_removes_a_pair_its_own_check_cannot_read(owner, tmp_path, monkeypatch, capsys):
    import wmbench.ownership as ownership

    def broken(*args, **kwargs):
        raise ownership.WmbenchError("cannot read it")

    monkeypatch.setattr(ownership, "detect", broken)
    files = ["--out-model", str(tmp_path / "m.safetensors"), "--out-key", str(tmp_path / "m.key")]
    assert main(["embed", str(owner / "s.yaml"), "--cache", str(owner / "cache"), "-q", "--reproducible-seed", "5", *files]) == 2
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.key").exists()


def test_a_reproducible_seed_torch_cannot_take_is_refused_before_training(owner, tmp_path, monkeypatch, capsys):
    """--reproducible-seed 2^64 (torch's generators take 64 bits): one line, exit 2, nothing trained
    or written (it was a ValueError traceback after the training)."""
    import wmbench.worker as worker

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the seed was checked")

    monkeypatch.setattr(worker.CellWorker, "trained", no_training)
    files = ["--out-model", str(tmp_path / "m.safetensors"), "--out-key", str(tmp_path / "m.key")]
    assert main(["embed", str(owner / "s.yaml"), "--cache", str(owner / "cache"), "-q", "--reproducible-seed", str(2**64), *files]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reproducible-seed" in err, err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.key").exists()


def test_wrapper_prefixes_and_missing_batchnorm_counters_still_give_a_verdict(owner, tmp_path, capsys):
    """torch.compile's _orig_mod. (nested in module.) and a file without num_batches_tracked: a
    thief's zero-cost way to make detect refuse the file."""
    state = load_file(str(owner / "wm.safetensors"))
    save_file({f"module._orig_mod.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(tmp_path / "w.safetensors"))
    verdict = detect(capsys, "--model", str(tmp_path / "w.safetensors"), "--key", str(owner / "wm.key"))
    assert verdict["detected"] and verdict["statistic"] > 0.99


def test_a_key_or_a_folder_given_as_the_model_says_so(owner, capsys):
    assert main(["detect", "--model", str(owner / "wm.key"), "--key", str(owner / "wm.key")]) == 2
    assert "a wmbench key file, not a model" in capsys.readouterr().err
    assert main(["detect", "--model", str(owner), "--key", str(owner / "wm.key")]) == 2
    assert "a directory, not a model file" in capsys.readouterr().err


def test_a_reference_of_another_architecture_is_named_as_the_reference(owner, tmp_path, capsys):
    state = load_file(str(owner / "wm.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("0.")}, str(tmp_path / "other.safetensors"))
    assert main(["detect", "--model", str(owner / "wm.safetensors"), "--key", str(owner / "wm.key"), "--resync", "--reference", str(tmp_path / "other.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"--reference {tmp_path / 'other.safetensors'}: key does not match the model" in err, err


def test_shape_error_points_to_resync_only_for_a_grown_suspect():
    from wmbench.errors import WmbenchError
    from wmbench.suspect_file import check_shapes

    key = {"0.weight": [16, 1, 3, 3], "0.bias": [16], "1.weight": [10, 16]}
    grown = {"0.weight": [24, 1, 3, 3], "0.bias": [24], "1.weight": [10, 24]}
    shrunk = {"0.weight": [8, 1, 3, 3], "0.bias": [8], "1.weight": [10, 8]}
    with pytest.raises(WmbenchError, match="--resync --reference"):
        check_shapes(key, grown, grown_hint=True)
    for shapes, hint in ((grown, False), (shrunk, True), ({**grown, "2.weight": [3]}, True)):
        with pytest.raises(WmbenchError) as caught:
            check_shapes(key, shapes, grown_hint=hint)
        assert "--resync" not in str(caught.value)
    check_shapes(key, grown, resized=True)  # with resync, sizes may differ
