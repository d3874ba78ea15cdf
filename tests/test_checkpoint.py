"""Epoch checkpoints: a training stopped after any epoch and run again continues from its
checkpoint and ends bit-identical to one never stopped (weights, key, clean figure), for methods
whose steps keep state of their own too; checkpoints from another thread count and damaged ones
are not used, and a plug-in that does not declare itself resumable starts over."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from wmbench.checkpoint import EpochCheckpoints
from wmbench.grid import expand
from wmbench.runner import Runner
from wmbench.scenario import parse_scenario
from wmbench.worker import CellWorker

# The recipe's generator-driven parts (shuffle, translate, flip, cutout) and a per-batch schedule.
TRAINING = {"epochs": 4, "batch_size": 64, "translate": 2, "flip": True, "cutout": 3, "schedule": "warmup_linear", "warmup_epochs": 0.5, "label_smoothing": 0.1}


class Stopped(Exception):
    """The run's end, after a checkpoint was written."""


def worker_for(tmp_path, method, cache: str, training: dict = TRAINING) -> tuple[CellWorker, object]:
    doc = {
        "name": "resume", "seeds": [0], "device": "cpu",
        "datasets": [{"name": "digits", "args": {"subset_train": 300}}],
        "models": [{"name": "small_cnn", "args": {"width": 8, "hidden": 32}}],
        "methods": [method], "training": training,
    }
    scenario = parse_scenario(doc, tmp_path)
    (cell,) = expand(scenario)
    return CellWorker(scenario, tmp_path / cache, torch.device("cpu"), progress=False), cell


@pytest.fixture
def every_epoch(monkeypatch):
    monkeypatch.setattr(EpochCheckpoints, "min_interval_s", 0.0)


def stop_after(monkeypatch, fit_index: int, epoch: int) -> None:
    """The next training raises Stopped right after writing the checkpoint of (fit, epoch)."""
    original = EpochCheckpoints.save

    def save(self, fit, ep, *args, **kwargs):
        original(self, fit, ep, *args, **kwargs)
        if (fit, ep) == (fit_index, epoch):
            monkeypatch.setattr(EpochCheckpoints, "save", original)
            raise Stopped

    monkeypatch.setattr(EpochCheckpoints, "save", save)


def assert_same(a, b) -> None:
    (model_a, key_a, meta_a), (model_b, key_b, meta_b) = a, b
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(x, y), name
    assert key_a.tensors.keys() == key_b.tensors.keys()
    for k in key_a.tensors:  # exact, NaN where the other has NaN (a channel with no carrier)
        assert torch.allclose(key_a.tensors[k], key_b.tensors[k], rtol=0, atol=0, equal_nan=True), k
    assert meta_a["metric_value"] == meta_b["metric_value"]


@pytest.mark.parametrize("method, fit_index, epoch", [
    ({"name": "none", "args": {"n_carriers": 64}}, 0, 1),
    ({"name": "watermas", "args": {"n_carriers": 64}}, 0, 2),
    ({"name": "li_sign", "args": {"bits": 16}}, 0, 2),  # stopped between pre-training and fine-tuning
    ({"name": "li_sign", "args": {"bits": 16}}, 1, 1),  # stopped inside the fine-tuning
    # steps with state of their own (StatefulStep): a step count, a noise generator, running means
    ({"name": "watermas", "args": {"n_carriers": 64, "mas_every": 3}}, 0, 1),
    ({"name": "tartaglione", "args": {"n_carriers": 64}}, 0, 2),
    ({"name": "deepsigns", "args": {"bits": 8}}, 0, 2),
    ({"name": "hufunet", "args": {}}, 0, 1),
])
@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
def test_a_stopped_training_resumes_bit_identical(tmp_path, monkeypatch, every_epoch, method, fit_index, epoch):
    worker, cell = worker_for(tmp_path, method, "whole")
    whole = worker.trained(cell)

    worker, cell = worker_for(tmp_path, method, "stopped")
    stop_after(monkeypatch, fit_index, epoch)
    with pytest.raises(Stopped):
        worker.trained(cell)
    partial = worker.cache.checkpoints_dir(cell.train_id)
    assert (partial / f"fit{fit_index}.safetensors").is_file()
    assert not worker.cache.has(cell.train_id)
    if fit_index == 0 and epoch == 1:  # the dry run says so
        plan = Runner(worker.scenario, worker.cache.root, "cpu").plan()
        assert "continues from an epoch checkpoint" in plan.describe()

    runs = []
    original_restore = EpochCheckpoints.restore
    monkeypatch.setattr(EpochCheckpoints, "restore", lambda self, *a: runs.append(r := original_restore(self, *a)) or r)
    resumed = worker.trained(cell)
    assert any(r is not None for r in runs)  # it did continue, rather than train again
    assert_same(whole, resumed)
    assert not partial.exists()  # removed once the training is stored


@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
@pytest.mark.parametrize("extra", [{"lookahead": True}, {"alternate_flip": True}], ids=["lookahead", "alternate_flip"])
@pytest.mark.parametrize("epoch", [1, 3])
def test_a_stopped_training_with_state_across_epochs_resumes_bit_identical(tmp_path, monkeypatch, every_epoch, epoch, extra):
    """The lookahead's slow weights are part of the checkpoint (without them a resumed training
    would average towards the weights it restarted from); the alternating flip continues at the
    epoch's parity with the fit's first draw."""
    training = {**TRAINING, **extra}
    method = {"name": "watermas", "args": {"n_carriers": 64}}
    worker, cell = worker_for(tmp_path, method, "whole", training)
    whole = worker.trained(cell)
    worker, cell = worker_for(tmp_path, method, "stopped", training)
    stop_after(monkeypatch, 0, epoch)
    with pytest.raises(Stopped):
        worker.trained(cell)
    assert_same(whole, worker.trained(cell))


@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
def test_checkpoints_from_another_thread_count_or_damaged_are_not_used(tmp_path, monkeypatch, every_epoch):
    method = {"name": "none", "args": {"n_carriers": 64}}
    worker, cell = worker_for(tmp_path, method, "whole")
    whole = worker.trained(cell)

    worker, cell = worker_for(tmp_path, method, "stopped")
    stop_after(monkeypatch, 0, 2)
    with pytest.raises(Stopped):
        worker.trained(cell)
    path = worker.cache.checkpoints_dir(cell.train_id) / "fit0.safetensors"
    def restore():
        checkpoints = worker._checkpoints(cell, worker.data(cell), cell.train_id)
        model = cell.model.obj.build(worker.data(cell))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return checkpoints.restore(0, TRAINING["epochs"], model, optimizer, torch.Generator(), {})

    assert restore() is not None
    threads = torch.get_num_threads()
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: threads + 1)
        assert restore() is None

    path.write_bytes(path.read_bytes()[:-100])  # truncated: trains from the start, same result
    assert_same(whole, worker.trained(cell))


def test_every_builtin_method_checkpoints_and_a_plugin_does_not_unless_it_says_so(tmp_path):
    from wmbench.registry import METHODS

    assert all(METHODS.get(name).resumable for name in METHODS.names())
    plugin = type("Plugin", (METHODS.get("none"),), {"resumable": False})
    worker, cell = worker_for(tmp_path, {"name": "none"}, "c")
    cell = dataclasses.replace(cell, method=dataclasses.replace(cell.method, obj=plugin()))
    assert worker._checkpoints(cell, worker.data(cell), cell.train_id) is None


@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
def test_a_checkpoint_that_cannot_be_written_costs_the_checkpoint_not_the_training(tmp_path, monkeypatch, every_epoch, caplog):
    import wmbench.checkpoint

    method = {"name": "none", "args": {"n_carriers": 64}}
    worker, cell = worker_for(tmp_path, method, "whole")
    whole = worker.trained(cell)

    def full_disk(path, data, mode=0o644):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(wmbench.checkpoint, "write_atomic", full_disk)
    worker, cell = worker_for(tmp_path, method, "full")
    assert_same(whole, worker.trained(cell))
    assert "epoch checkpoint not written" in caplog.text


@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
@pytest.mark.parametrize("damage", ["no trainer rng", "epoch 'x'", "epoch beyond the fit", "negative epoch", "epoch beyond its timed ones", "short torch rng", "NaN weights"])
def test_a_damaged_checkpoint_is_set_aside_and_the_fit_trains_from_its_start(tmp_path, monkeypatch, every_epoch, damage):
    """Each of these failed every rerun the same way (KeyError, ValueError, RuntimeError,
    TrainingDiverged) and the checkpoint was never set aside."""
    from safetensors.torch import load, save

    from wmbench.checkpoint import checkpoint_digest
    from wmbench.safe_io import safetensors_metadata

    method = {"name": "none", "args": {"n_carriers": 64}}
    worker, cell = worker_for(tmp_path, method, "whole")
    whole = worker.trained(cell)
    worker, cell = worker_for(tmp_path, method, "stopped")
    stop_after(monkeypatch, 0, 2)
    with pytest.raises(Stopped):
        worker.trained(cell)
    path = worker.cache.checkpoints_dir(cell.train_id) / "fit0.safetensors"
    raw = path.read_bytes()
    tensors, progress = load(raw), json.loads(safetensors_metadata(raw)["progress"])
    if damage == "no trainer rng":
        del tensors["rng/trainer"]
    elif damage == "epoch 'x'":
        progress["epoch"] = "x"
    elif damage == "epoch beyond the fit":
        progress["epoch"] = 99
    elif damage == "negative epoch":
        progress["epoch"] = -1
    elif damage == "epoch beyond its timed ones":
        progress["epoch"] = 3  # of 4, after 2 timed epochs
    elif damage == "short torch rng":
        tensors["rng/torch"] = tensors["rng/torch"][:10].clone()
    else:
        name = next(k for k in tensors if k.startswith("model/") and tensors[k].is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    text = json.dumps(progress)  # resealed: each damage caught by its own check, not the digest
    path.write_bytes(save(tensors, metadata={"progress": text, "sha256": checkpoint_digest(text, tensors)}))
    assert_same(whole, worker.trained(cell))


def stopped_checkpoint(tmp_path, monkeypatch, method, cache: str = "stopped"):
    """A training of ``method`` stopped after epoch 2 of 4: its worker, cell and fit-0 checkpoint."""
    worker, cell = worker_for(tmp_path, method, cache)
    stop_after(monkeypatch, 0, 2)
    with pytest.raises(Stopped):
        worker.trained(cell)
    return worker, cell, worker.cache.checkpoints_dir(cell.train_id) / "fit0.safetensors"


@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
@pytest.mark.parametrize("edit", ["epoch 2 -> 3", "epoch 2 -> 1", "weights", "momentum", "no digest"])
def test_an_edited_checkpoint_is_set_aside_with_a_warning_not_resumed(tmp_path, monkeypatch, every_epoch, caplog, edit):
    """An epoch inside the schedule, weights or momentum edited after the checkpoint was written
    (its SHA-256 left as it was): resumed silently before, ending on another model than an
    uninterrupted training's, which the cache then stored as this training."""
    from safetensors.torch import load, save

    from wmbench.safe_io import safetensors_metadata

    method = {"name": "watermas", "args": {"n_carriers": 64}}
    worker, cell = worker_for(tmp_path, method, "whole")
    whole = worker.trained(cell)
    worker, cell, path = stopped_checkpoint(tmp_path, monkeypatch, method)
    raw = path.read_bytes()
    metadata = safetensors_metadata(raw)
    tensors, progress = load(raw), json.loads(metadata["progress"])
    if edit == "epoch 2 -> 3":
        progress["epoch"] = 3
    elif edit == "epoch 2 -> 1":
        progress["epoch"], progress["epoch_seconds"] = 1, progress["epoch_seconds"][:1]
    elif edit in ("weights", "momentum"):
        name = next(k for k in tensors if k.startswith("model/" if edit == "weights" else "optim/") and tensors[k].is_floating_point())
        tensors[name] = tensors[name] * 1.5
    if edit == "no digest":
        metadata.pop("sha256", None)
    metadata["progress"] = json.dumps(progress, sort_keys=True)
    path.write_bytes(save(tensors, metadata=metadata))
    caplog.clear()
    assert_same(whole, worker.trained(cell))  # trained from its start
    assert "set aside" in caplog.text and "trains from its start" in caplog.text  # (its folder goes once the training is stored)


@pytest.mark.at_chance("plumbing: checkpoints and resumed trainings, learned or not")
def test_another_trainings_checkpoint_is_set_aside_with_a_warning(tmp_path, monkeypatch, every_epoch, caplog):
    """The checkpoint of another configuration (another seed's training, same model) put in this
    training's place: not used, and said so, instead of being skipped in silence."""
    import shutil

    method = {"name": "none", "args": {"n_carriers": 64}}
    _, _, theirs = stopped_checkpoint(tmp_path, monkeypatch, {"name": "watermas", "args": {"n_carriers": 64}}, "other")
    worker, cell = worker_for(tmp_path, method, "whole")
    whole = worker.trained(cell)
    worker, cell = worker_for(tmp_path, method, "mine")
    path = worker.cache.checkpoints_dir(cell.train_id) / "fit0.safetensors"
    path.parent.mkdir(parents=True)
    shutil.copy(theirs, path)
    caplog.clear()
    assert_same(whole, worker.trained(cell))
    assert "another training's or fit's" in caplog.text and "set aside" in caplog.text


def test_a_checkpoint_of_another_fit_is_not_restored(tmp_path, caplog):
    """Li's fine-tuning checkpoint (fit 1) under the pre-training's name (fit 0): same training,
    same shapes, another schedule; set aside."""
    import shutil

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoints = EpochCheckpoints(tmp_path / "p", {"train_id": "t"})
    checkpoints.save(1, 2, 2, [0.1, 0.1, 0.1, 0.1], model, optimizer, torch.Generator(), {})
    assert checkpoints.restore(1, 2, model, optimizer, torch.Generator(), {}) is not None
    shutil.copy(checkpoints.path(1), checkpoints.path(0))
    assert checkpoints.restore(0, 2, model, optimizer, torch.Generator(), {}) is None
    assert "another training's or fit's" in caplog.text and not checkpoints.path(0).exists()


def test_a_cuda_training_checkpoints_its_own_devices_generator(tmp_path, monkeypatch, every_epoch):
    """A training on cuda:1 saves and restores cuda:1's generator (its dropout draws), not the
    current device's (torch.cuda.get_rng_state's default, cuda:0: a resumed run then drew other
    dropout masks than one never stopped); a CPU training none. CUDA faked: the calls are recorded."""
    calls = []

    def get_rng_state(device="cuda"):
        calls.append(("get", torch.device(device)))
        return torch.full((16,), 7, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", torch.device(device))))
    worker, cell = worker_for(tmp_path, "none", "cache")
    worker._device = torch.device("cuda", 1)
    checkpoints = worker._checkpoints(cell, worker.data(cell), cell.train_id)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoints.save(0, 1, 2, [0.1], model, optimizer, torch.Generator(), {})
    assert calls == [("get", torch.device("cuda", 1))]
    calls.clear()
    assert checkpoints.restore(0, 2, model, optimizer, torch.Generator(), {}) is not None
    assert ("set", torch.device("cuda", 1)) in calls and all(device == torch.device("cuda", 1) for _, device in calls)
    calls.clear()
    on_cpu = EpochCheckpoints(tmp_path / "cpu", {"train_id": "t"})
    on_cpu.save(0, 1, 2, [0.1], model, optimizer, torch.Generator(), {})
    assert on_cpu.restore(0, 2, model, optimizer, torch.Generator(), {}) is not None and calls == []
