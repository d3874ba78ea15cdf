"""The cache cannot be made to lie: tampered rows and meta are set aside and recomputed, a damaged
decoded dataset is decoded again, no symlink is followed, a short write leaves no torn line,
secrets-adjacent files are private, and two runs sharing a cache train each model once."""

from __future__ import annotations

import errno
import json
import os
import threading

import pandas as pd
import pytest
import torch

from wmbench.api import Key
from wmbench.cache import TrainCache
from wmbench.cli import main
from wmbench.datasets.decoded import cached_splits
from wmbench.grid import expand
from wmbench.results import ResultStore
from wmbench.scenario import parse_scenario
from wmbench.worker import CellWorker

SCENARIO = """
name: lie
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 200}}]
models: [{name: small_cnn, args: {width: 4, hidden: 8}}]
methods: [{name: none, args: {n_carriers: 64}}]
training: {epochs: 1}
attacks: [{name: noise, strengths: [1.0]}]
"""


def run(tmp_path) -> pd.DataFrame:
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 0
    return pd.read_csv(tmp_path / "lb" / "lie.csv")


@pytest.mark.at_chance("plumbing: a damaged or shared cache")
def test_tampered_rows_are_set_aside_and_recomputed(tmp_path):
    (tmp_path / "s.yaml").write_text(SCENARIO)
    clean = run(tmp_path)
    store = tmp_path / "c" / "results" / "lie.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    with open(store, "a") as fh:  # forged rows for real cell ids: last one wins today
        fh.write(json.dumps({"cell_id": rows[0]["cell_id"]}) + "\n")
        fh.write(json.dumps({**rows[1], "scenario": "EVIL", "error": 99}) + "\n")
        fh.write(json.dumps({**rows[0], "error": "ninety-nine"}) + "\n")
        fh.write(json.dumps({**rows[1], "metric_value": 7.0}) + "\n")
        fh.write(json.dumps({**rows[0], "detect_pvalue": float("nan")}) + "\n")
    again = run(tmp_path)
    assert "EVIL" not in set(again["scenario"]) and 99 not in set(again["error"])
    assert again["metric_value"].between(0, 1).all() and again["detect_pvalue"].notna().all()
    columns = [c for c in clean.columns if c not in ("train_s_per_epoch", "attack_s", "eval_s", "peak_mem_mb")]
    pd.testing.assert_frame_equal(clean[columns], again[columns])


@pytest.fixture
def entry(tmp_path):
    cache = TrainCache(tmp_path / "c")
    model = torch.nn.Linear(3, 2)
    cache.put("t1", model, Key("none", {"x": torch.ones(2)}), {"metric_value": 0.5, "method": "none", "train_s_per_epoch": 1.0})
    return cache, tmp_path / "c" / "models" / "t1" / "meta.json"


@pytest.mark.parametrize("edit", [
    lambda m: {**m, "sha256": {}},
    lambda m: {k: v for k, v in m.items() if k != "sha256"},
    lambda m: {**m, "sha256": {"model.safetensors": m["sha256"]["model.safetensors"]}},
    lambda m: {k: v for k, v in m.items() if k != "metric_value"},
    lambda m: {**m, "metric_value": "EVIL"},
    lambda m: {**m, "metric_value": 7.5},
    lambda m: {**m, "train_s_per_epoch": -1},
    lambda m: [m],
    lambda m: {**m, "metric_value": 0.99},  # a plausible clean accuracy: every error_delta would move
    lambda m: {**m, "method": "watermas"},
], ids=["empty digest", "no digest", "partial digest", "no metric", "text metric", "metric > 1", "negative time", "not an object",
        "plausible metric", "other method"])
def test_tampered_meta_is_damage(entry, edit):
    cache, meta_path = entry
    assert cache.get("t1") is not None and cache.get("t1", "none") is not None
    meta = json.loads(meta_path.read_text())
    os.chmod(meta_path, 0o600)
    meta_path.write_text(json.dumps(edit(meta)))
    assert cache.get("t1") is None  # set aside: the training runs again


def test_an_older_entry_of_another_method_is_set_aside(entry):
    """Entries stored before meta.json carried its own digest: a method other than the cell's is
    foreign (moved folders), set aside and trained again, not a failure on every rerun."""
    cache, meta_path = entry
    meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("meta_sha256", "train_id")}
    meta_path.write_text(json.dumps(meta))
    assert cache.get("t1", "none") is not None
    assert cache.get("t1", "watermas") is None and not meta_path.exists()


def test_meta_is_private_and_cache_dirs_are_0700(entry):
    cache, meta_path = entry
    assert meta_path.stat().st_mode & 0o777 == 0o600
    assert cache.models_dir.stat().st_mode & 0o777 == 0o700
    assert meta_path.parent.stat().st_mode & 0o077 == 0


def test_results_file_is_never_followed_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "s.jsonl").symlink_to(victim)
    store = ResultStore(tmp_path / "results" / "s.jsonl")
    with pytest.raises(OSError) as info:
        store.append("cell", {"scenario": "s"})
    assert info.value.errno == errno.ELOOP
    assert victim.read_text() == "precious\n"
    with pytest.raises(OSError):
        store.rows()


def test_short_write_leaves_no_torn_line(tmp_path, monkeypatch):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append("a", {"scenario": "s"})
    before = (tmp_path / "r.jsonl").read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[: len(data) // 2]))
    with pytest.raises(OSError) as info:
        store.append("b", {"scenario": "s", "long": "x" * 100})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "r.jsonl").read_bytes() == before


def test_damaged_decoded_dataset_is_decoded_again(tmp_path):
    calls = []

    def decode():
        calls.append(1)
        x = torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4)
        return (x, torch.tensor([0, 1, 2])), (x[:2].clone(), torch.tensor([1, 0]))

    path = tmp_path / "datasets" / "d.safetensors"
    first = cached_splits(path, decode)
    assert torch.equal(cached_splits(path, decode)[0], first[0]) and len(calls) == 1
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 7])  # truncated
    assert torch.equal(cached_splits(path, decode)[0], first[0]) and len(calls) == 2
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one pixel flipped, file still well formed
    path.write_bytes(bytes(raw))
    assert torch.equal(cached_splits(path, decode)[0], first[0]) and len(calls) == 3


@pytest.mark.at_chance("plumbing: a damaged or shared cache")
def test_two_runs_sharing_a_cache_train_each_model_once(tmp_path, monkeypatch):
    import yaml

    scenario = parse_scenario(yaml.safe_load(SCENARIO), tmp_path)
    (cell,) = expand(scenario)
    method_cls = type(cell.method.obj)
    real_embed = method_cls.embed
    trainings = []

    def counting_embed(self, model, trainer, rng):
        trainings.append(threading.get_ident())
        return real_embed(self, model, trainer, rng)

    monkeypatch.setattr(method_cls, "embed", counting_embed)
    errors = []

    def work():
        try:
            CellWorker(scenario, tmp_path / "c", torch.device("cpu"), progress=False).trained(cell)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(trainings) == 1


@pytest.mark.at_chance("plumbing: a damaged or shared cache")
def test_swapped_trainings_are_not_served_under_each_others_ids(tmp_path):
    """Two entries' folders exchanged (a bad sync, a hand edit): `none` read WaterMAS's model and
    reported its mark detected. Entries name their training now and are set aside and retrained;
    older ones (no train_id) are set aside by method."""
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("methods: [{name: none, args: {n_carriers: 64}}]", "methods: [{name: none, args: {n_carriers: 64}}, {name: watermas, args: {n_carriers: 64}}]"))
    clean = run(tmp_path)
    models = tmp_path / "c" / "models"
    first, second = sorted(p for p in models.iterdir() if (p / "meta.json").is_file())
    first.rename(models / "swap")
    second.rename(first)
    (models / "swap").rename(second)
    (tmp_path / "c" / "results" / "lie.jsonl").unlink()
    again = run(tmp_path)
    columns = ["method", "attack", "strength", "error", "detect_stat", "detected"]
    pd.testing.assert_frame_equal(clean[columns], again[columns])
    for entry in (first, second):  # as an older wmbench wrote them (no train_id, no own digest), then swapped again
        meta = json.loads((entry / "meta.json").read_text())
        del meta["train_id"], meta["meta_sha256"]
        (entry / "meta.json").write_text(json.dumps(meta))
    first.rename(models / "swap")
    second.rename(first)
    (models / "swap").rename(second)
    (tmp_path / "c" / "results" / "lie.jsonl").unlink()
    again = run(tmp_path)  # refused by method, set aside and retrained
    pd.testing.assert_frame_equal(clean[columns], again[columns])


def test_a_store_that_is_not_a_results_store_is_refused_untouched(tmp_path, capsys):
    """--store out/x.csv appended JSON lines to a leaderboard CSV; a folder gave a misleading error."""
    (tmp_path / "s.yaml").write_text(SCENARIO)
    csv = tmp_path / "board.csv"
    csv.write_text("scenario,model\nlie,small_cnn\n")
    for store, why in ((csv, "not a wmbench results store"), (tmp_path, "not a file")):
        assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--store", str(store), "-q"]) == 2
        assert why in capsys.readouterr().err
    assert csv.read_text() == "scenario,model\nlie,small_cnn\n"


@pytest.mark.at_chance("plumbing: a damaged or shared cache")
def test_garbage_in_the_caches_own_store_is_set_aside(tmp_path):
    """The cache's results store (no --store) overwritten with garbage blocked every run with a
    message about --store, an option never passed: it is damage, set aside and recomputed."""
    (tmp_path / "s.yaml").write_text(SCENARIO)
    clean = run(tmp_path)
    store = tmp_path / "c" / "results" / "lie.jsonl"
    store.write_bytes(bytes(range(256)) * 8)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--dry-run"]) == 0
    assert not list(store.parent.glob("lie.jsonl.damaged-*"))  # a dry run changes nothing
    again = run(tmp_path)
    columns = ["method", "attack", "strength", "error", "detect_stat", "detected"]
    pd.testing.assert_frame_equal(clean[columns], again[columns])
    assert len(list(store.parent.glob("lie.jsonl.damaged-*"))) == 1


def test_a_training_held_by_another_run_is_reported_while_waited_for(tmp_path, monkeypatch, caplog):
    import subprocess
    import sys

    import wmbench.cache

    monkeypatch.setattr(wmbench.cache, "LOCK_NOTICE_S", 0.1)
    (tmp_path / "c" / "locks").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom filelock import FileLock\n"
        f"lock = FileLock({str(tmp_path / 'c' / 'locks' / 't1.lock')!r}); lock.acquire(); print('held', flush=True); time.sleep(1)"
    )], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with TrainCache(tmp_path / "c").training_lock("t1"):
        pass
    assert holder.wait(timeout=30) == 0 and "held by another run sharing this cache" in caplog.text
