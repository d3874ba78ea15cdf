"""Two copies of one dataset in a grid (entries differing only in ``root``, so in no id) each get
their own training, clean evaluation and rows, locally and under the Ray executor's task order; a
plug-in dataset drawing from the global generators is the same in every process (found by a probe,
2026-12-05)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import plugin_scenario, run_scenario
from PIL import Image

from wmbench.cache import TrainCache
from wmbench.grid import expand
from wmbench.results import MEASURED_COLUMNS
from wmbench.runner import Runner
from wmbench.scenario import load_scenario
from wmbench.worker import CellWorker

TWO_COPIES = """
name: {name}
seeds: [0]
device: cpu
datasets:
{datasets}
models: [{{name: small_cnn, args: {{width: 4, hidden: 8}}}}]
methods: [{{name: watermas, args: {{n_carriers: 64}}}}]
training: {{epochs: 2, batch_size: 8}}
attacks: [{{name: noise, strengths: [0.5]}}]
"""


def write_copy(root: Path, invert: bool) -> None:
    """A small ImageFolder copy: ten classes, 3 train and 1 test images each, noisy flat colours
    (``invert``: the same images inverted, another copy of the same classes)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        for c, name in enumerate("abcdefghij"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                colour = np.array([25 * c, 255 - 25 * c, (80 * c) % 256])
                image = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(255 - image if invert else image).save(root / split / name / f"{i}.png")


def two_copies(tmp_path: Path, name: str = "copies", labels: tuple[str, ...] = ("copyA", "copyB")) -> Path:
    roots = {"copyA": tmp_path / "a", "copyB": tmp_path / "b"}
    for label, root in roots.items():
        if not root.exists():
            write_copy(root, invert=label == "copyB")
    entries = "\n".join(f"  - {{name: cifar10, label: {label}, args: {{layout: imagefolder, root: {roots[label]}}}}}" for label in labels)
    path = tmp_path / f"{name}.yaml"
    path.write_text(TWO_COPIES.format(name=name, datasets=entries))
    return path


def rows(path: Path, cache: Path) -> pd.DataFrame:
    frame = Runner(load_scenario(path), cache, progress=False).run()
    return frame.drop(columns=[*MEASURED_COLUMNS, "scenario"]).set_index(["dataset", "attack", "strength"]).sort_index()


@pytest.mark.at_chance("plumbing: training ids and evaluations of copies of one dataset")
def test_two_copies_keep_the_ids_and_each_gets_its_own_clean_evaluation(tmp_path: Path) -> None:
    """copyB's strength-0 row showed copyA's clean model (error_delta -3.33 at strength 0): the
    clean evaluation was kept per train id, which both copies share."""
    path = two_copies(tmp_path)
    cells = expand(load_scenario(path))
    assert len(cells) == 2 and cells[0].train_id == cells[1].train_id  # where data lies is in no id (stores stay valid)
    both = rows(path, tmp_path / "c")
    clean = both.xs(0.0, level="strength")
    assert (clean["error"] == clean["error_clean"]).all() and (clean["error_delta"] == 0).all(), clean[["error", "error_clean"]]
    assert both.loc["copyA", "data_digest"].nunique() == both.loc["copyB", "data_digest"].nunique() == 1
    assert both.loc["copyA", "data_digest"].iloc[0] != both.loc["copyB", "data_digest"].iloc[0]
    alone = rows(two_copies(tmp_path, "copies_b", ("copyB",)), tmp_path / "c_b")  # copyB alone: the same rows
    pd.testing.assert_frame_equal(both.loc[["copyB"]], alone, check_dtype=False)
    assert len(list((tmp_path / "c" / "models").iterdir())) == 2


class Ref:
    """A finished task's result, hashable by identity as Ray's object refs are."""

    def __init__(self, value) -> None:
        self.value = value


class InlineRay:
    """A stand-in for ray running every task at once in this process, as one Ray worker process
    would run them one after another (the worker shipped by pickling, as ``ray.put`` does)."""

    class exceptions:  # noqa: N801 - as ray's module
        class RayError(Exception):
            pass

    def __init__(self) -> None:
        self.trained: list[str] = []

    def put(self, obj):
        return pickle.loads(pickle.dumps(obj))

    def cluster_resources(self):
        return {"CPU": 1}

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, *args):
                if fn.__name__ == "train_task":
                    ray.trained.append(args[2])
                return Ref(fn(*args))

        return Task()

    def wait(self, refs, num_returns):
        return [refs[0]], []

    def get(self, ref):
        return ref.value

    def cancel(self, ref):
        raise AssertionError("nothing is left to cancel")


@pytest.mark.at_chance("plumbing: training ids and evaluations of copies of one dataset")
def test_under_ray_each_copy_is_trained_and_attacked_as_its_own(tmp_path: Path) -> None:
    """Under Ray copyB was never trained: its training merged into copyA's, and its attack tasks
    reused the model, meta and clean rows a worker process held for copyA's train id."""
    from wmbench.ray_executor import RayExecutor, trainings_in_order

    path = two_copies(tmp_path)
    scenario = load_scenario(path)
    todo = [(cell, list(cell.attacks)) for cell in expand(scenario)]
    assert len(trainings_in_order(todo)) == 2
    ray = InlineRay()
    remote = dict(RayExecutor()._run(ray, CellWorker(scenario, tmp_path / "ray", "cpu", progress=False), todo))
    assert len(ray.trained) == 2 and len(list((tmp_path / "ray" / "models").iterdir())) == 2
    # each training in a worker of its own: nothing held in a process can be mixed up
    local = {cell_id: row for cell, attacks in todo for cell_id, row in CellWorker(scenario, tmp_path / "local", "cpu", progress=False).run_cell(cell, attacks)}
    assert remote.keys() == local.keys()
    for cell_id, row in local.items():
        for column in ("dataset", "strength", "error", "error_clean", "detect_stat", "data_digest"):
            assert remote[cell_id][column] == row[column], (column, row["dataset"], row["strength"])


GLOBAL_RNG_DATASET = '''
import random
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits

from wmbench.data import DataBundle, Dataset
from wmbench.registry import DATASETS


@DATASETS.register("global_rng_digits")
@dataclass(frozen=True)
class GlobalRngDigits(Dataset):
    """digits split at random by torch's, numpy's or Python's global generator (no seed of its own)."""

    source: str = "torch"

    def load(self, cache_dir):
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        if self.source == "torch":
            perm = torch.randperm(len(y))
        elif self.source == "numpy":
            perm = torch.from_numpy(np.random.permutation(len(y)))
        else:
            perm = torch.tensor(random.sample(range(len(y)), len(y)))
        tr, te = perm[:300], perm[300:700]
        return DataBundle("global_rng_digits", x[tr], y[tr], x[te], y[te], 10)
'''


@pytest.fixture(scope="module")
def rng_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "rng.py"
    path.write_text(GLOBAL_RNG_DATASET)
    return path


def test_a_dataset_drawing_from_the_global_generators_is_the_same_in_every_process(tmp_path: Path, rng_plugin: Path) -> None:
    """Its load() ran unseeded: every process (a rerun, a Ray worker) drew another split, so a
    cached model was measured on another test split (error_delta -7.5 at strength 0)."""
    import random

    for source in ("torch", "numpy", "random"):
        path = plugin_scenario(tmp_path, rng_plugin, "none", name=f"rng_{source}")
        path.write_text(path.read_text().replace("datasets: [{name: digits, args: {subset_train: 200, subset_test: 100}}]",
                                                 f"datasets: [{{name: global_rng_digits, args: {{source: {source}}}}}]"))
        scenario = load_scenario(path)
        cell = expand(scenario)[0]
        loads = []
        for seed in (1, 2):  # two processes whose global generators stand elsewhere
            torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
            before = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
            loads.append(CellWorker(scenario, tmp_path / "c", "cpu", progress=False).data(cell))
            after = torch.random.get_rng_state(), np.random.get_state()[1], random.getstate()
            assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2], source  # left as found
        assert torch.equal(loads[0].test_x, loads[1].test_x) and torch.equal(loads[0].train_y, loads[1].train_y), source


def test_a_cached_model_of_a_generated_dataset_is_measured_on_its_own_test_split(tmp_path: Path, rng_plugin: Path) -> None:
    path = plugin_scenario(tmp_path, rng_plugin, "none", name="rng")
    path.write_text(path.read_text().replace("datasets: [{name: digits, args: {subset_train: 200, subset_test: 100}}]", "datasets: [global_rng_digits]"))
    assert run_scenario(path, tmp_path / "c")[0] == 0
    path.write_text(path.read_text().replace("attacks: [{name: noise, strengths: [0.1]}]", "attacks: [{name: noise, strengths: [0.1]}, {name: prune, strengths: [0.1]}]"))
    code, frame = run_scenario(path, tmp_path / "c")  # the training from the cache, the prune cells new
    clean = frame[frame["strength"] == 0]
    assert code == 0 and len(clean) == 2 and (clean["error_delta"] == 0).all(), clean[["attack", "error", "error_clean"]]


def train_copy_a(tmp_path: Path, cache: Path, methods: str | None = None, seeds: str | None = None) -> None:
    """Train copyA's cells alone into ``cache``: copyB's (the same train ids) stay to do."""
    path = two_copies(tmp_path, "copy_a_only", ("copyA",))
    text = path.read_text()
    if methods is not None:
        text = text.replace("methods: [{name: watermas, args: {n_carriers: 64}}]", f"methods: {methods}")
    if seeds is not None:
        text = text.replace("seeds: [0]", f"seeds: {seeds}")
    path.write_text(text)
    scenario = load_scenario(path)
    worker = CellWorker(scenario, cache, "cpu", progress=False)
    for cell in expand(scenario):
        worker.trained(cell)


@pytest.mark.at_chance("plumbing: training ids and evaluations of copies of one dataset")
def test_the_dry_run_counts_each_copy_as_a_training(tmp_path: Path) -> None:
    """Both copies share one train id; the count said 1 training (and 1 cached once copyA had
    trained), while the run trains each copy."""
    runner = Runner(load_scenario(two_copies(tmp_path)), tmp_path / "c", progress=False)
    assert "trainings: 2 (0 cached, 2 to do;" in runner.plan().describe()
    train_copy_a(tmp_path, tmp_path / "c")
    assert "trainings: 2 (1 cached, 1 to do;" in runner.plan().describe()


@pytest.mark.at_chance("plumbing: training ids and evaluations of copies of one dataset")
def test_preflight_checks_a_copy_whose_twin_is_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copyB's pre-flight was skipped once copyA's training (the same train id) was in the cache,
    though copyB still had its own to do."""
    train_copy_a(tmp_path, tmp_path / "c")
    runner = Runner(load_scenario(two_copies(tmp_path)), tmp_path / "c", progress=False)
    checked: list[str] = []
    monkeypatch.setattr(runner._inspector, "check_keygen", lambda cell: checked.append(cell.dataset.label))
    runner.preflight(runner.plan())
    assert "copyB" in checked


@pytest.mark.at_chance("plumbing: training ids and evaluations of copies of one dataset")
def test_the_null_announces_each_copys_trainings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With copyA's unwatermarked models in the cache, the null announced no training to do,
    then trained copyB's."""
    from wmbench.null import MIN_SEEDS, announce_trainings, null_scenario

    none = "{name: none, args: {n_carriers: 64}}"
    path = two_copies(tmp_path)
    path.write_text(path.read_text().replace("methods: [", f"methods: [{none}, "))
    scenario = load_scenario(path)
    reduced, _ = null_scenario(scenario)
    worker = CellWorker(reduced, tmp_path / "c", "cpu", progress=False)
    announce_trainings(scenario, reduced, worker)
    assert f"null: {2 * MIN_SEEDS} unwatermarked training(s) to do first" in capsys.readouterr().err
    train_copy_a(tmp_path, tmp_path / "c", methods=f"[{none}]", seeds=str(list(reduced.seeds)))
    announce_trainings(scenario, reduced, worker)
    assert f"null: {MIN_SEEDS} unwatermarked training(s) to do first" in capsys.readouterr().err


@pytest.mark.at_chance("plumbing: training ids and evaluations of copies of one dataset")
def test_two_labels_of_one_dataset_are_one_training(tmp_path: Path) -> None:
    """Entries differing only in their label share one stored training (the worker serves it to
    both): counted by label, the dry run said '2 (1 cached, 1 to do' forever after the run."""
    path = two_copies(tmp_path)
    path.write_text(path.read_text().replace(f"root: {tmp_path / 'b'}", f"root: {tmp_path / 'a'}"))  # copyB: copyA's data
    runner = Runner(load_scenario(path), tmp_path / "c", progress=False)
    assert "trainings: 1 (0 cached, 1 to do;" in runner.plan().describe()
    runner.run()
    assert "trainings: 1 (1 cached, 0 to do;" in runner.plan().describe()


def test_an_entry_set_aside_is_not_a_stored_copy(tmp_path: Path) -> None:
    cache = TrainCache(tmp_path / "c")
    for name in ("abc-data0011223344556677", "abc-data0011223344556677.damaged-1-ff"):
        (cache.models_dir / name).mkdir(parents=True)
        (cache.models_dir / name / "meta.json").write_text("{}")
    assert cache.stored_copies("abc") == 1
