"""The Ray executor on a real local Ray instance: the same CSV as the local executor."""

from __future__ import annotations

import logging
import pickle
import sys

import pandas as pd
import pytest
import ray
import torch

from wmbench.cli import main
from wmbench.errors import ConfigError, WmbenchError
from wmbench.executors import make_executor
from wmbench.results import MEASURED_COLUMNS

SCENARIO = """
name: raytiny
seeds: [0]
device: cpu
resources: {num_cpus: 1, num_gpus: 0}
datasets: [{name: digits, args: {subset_train: 400}}]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods:
  - none
  - {name: watermas, args: {n_carriers: 128}}
  - {name: watermas, label: watermas+align, args: {n_carriers: 128, align: true}}
training: {epochs: 2}
attacks:
  - {name: noise, strengths: [1.0]}
  - {name: prune, strengths: [0.5]}
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(tmp_path, name: str, *extra: str) -> int:
    return main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / name), "--out", str(tmp_path / f"lb-{name}"), "-q", *extra])


def test_ray_csv_equals_the_local_executors(tmp_path, local_ray, caplog):
    (tmp_path / "s.yaml").write_text(SCENARIO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (num_cpus: 1): results depend on the thread count
    try:
        assert run(tmp_path, "local") == 0
    finally:
        torch.set_num_threads(threads)
    with caplog.at_level(logging.INFO, logger="wmbench.ray_executor"):
        assert run(tmp_path, "ray", "--executor", "ray") == 0
    assert "ray: 2 training tasks, 12 attack tasks" in caplog.text  # the align variant shares its training
    local = pd.read_csv(tmp_path / "lb-local" / "raytiny.csv").drop(columns=MEASURED_COLUMNS)
    remote = pd.read_csv(tmp_path / "lb-ray" / "raytiny.csv").drop(columns=MEASURED_COLUMNS)
    assert len(remote) == 3 * 4
    pd.testing.assert_frame_equal(local, remote)
    assert len(list((tmp_path / "ray" / "models").iterdir())) == 2
    # a rerun finds every cell done
    assert run(tmp_path, "ray", "--executor", "ray") == 0
    assert len((tmp_path / "ray" / "results" / "raytiny.jsonl").read_text().splitlines()) == 12


def test_a_user_error_in_a_ray_task_is_one_line_exit_2(tmp_path, local_ray, capsys):
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("n_carriers: 128}}\n", "n_carriers: 100000}}\n", 1))
    assert run(tmp_path, "ray", "--executor", "ray") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wmbench: error: ") and len(err.splitlines()) == 1
    assert "s.yaml: methods[1].args.n_carriers: 100000 carriers requested" in err


def test_config_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(ConfigError("training.epochs", "bad", "s.yaml")))
    assert str(error) == "s.yaml: training.epochs: bad"


def test_without_ray_installed_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    executor = make_executor("ray")
    with pytest.raises(WmbenchError, match=r"pip install 'wmbench\[ray\]'"):
        next(iter(executor.run(None, [])))  # type: ignore[arg-type]


def test_a_failing_training_under_ray_fails_its_cells_only(tmp_path, local_ray, capsys):
    from test_cell_failures import EXIT_CELLS_FAILED, write

    args = write(tmp_path, "ray")  # a plug-in method whose training raises; BOOM_ATTACK unset: attacks work
    assert main([*args, "--executor", "ray"]) == EXIT_CELLS_FAILED
    assert "4 of 8 cells failed" in capsys.readouterr().err
    frame = pd.read_csv(tmp_path / "lb" / "failing.csv")
    failed = frame[frame["failure"].notna()]
    assert set(failed["method"]) == {"diverges_ray"} and len(failed) == 4
    assert (failed["failure"] == "training: FloatingPointError: loss is nan").all()
    assert frame[frame["failure"].isna()]["error"].notna().all()


class FifoRay:
    """A stand-in for ray on a busy node: each ``wait`` finishes the oldest submitted task."""

    exceptions = ray.exceptions

    def __init__(self, cpus: float) -> None:
        self.cpus, self.queue, self.finished = cpus, [], []

    def put(self, obj):
        return obj

    def cluster_resources(self):
        return {"CPU": self.cpus}

    def remote(self, fn):
        fifo = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, run_id, worker, cell_id, *after):
                fifo.queue.append((fn.__name__, cell_id))
                return fifo.queue[-1]

        return Task()

    def wait(self, refs, num_returns):
        ref = next(r for r in self.queue if r in refs)
        self.queue.remove(ref)
        self.finished.append(ref)
        return [ref], []

    def get(self, ref):
        return {"cell_id": ref[1]}

    def cancel(self, ref):
        raise AssertionError("nothing is left to cancel")


def test_ray_runs_a_finished_trainings_attacks_before_the_next_training(tmp_path):
    from conftest import TINY_SCENARIO

    from wmbench.grid import expand
    from wmbench.ray_executor import RayExecutor
    from wmbench.scenario import load_scenario
    from wmbench.grid import training_key
    from wmbench.worker import CellWorker

    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="fifo").replace("seeds: [0]", "seeds: [0, 1]"))
    scenario = load_scenario(tmp_path / "s.yaml")
    todo = [(cell, list(cell.attacks)) for cell in expand(scenario)]
    fifo = FifoRay(cpus=2)
    rows = list(RayExecutor()._run(fifo, CellWorker(scenario, tmp_path, "cpu"), todo))
    assert len(rows) == sum(len(attacks) for _, attacks in todo) == 8
    kinds = "".join("T" if name == "train_task" else "a" for name, _ in fifo.finished)
    assert kinds == "TTaaaaTTaaaa"  # two slots: two trainings, their cells, then the next two
    trained = [cell_id for name, cell_id in fifo.finished if name == "train_task"]
    assert trained == list(dict.fromkeys(training_key(cell) for cell, _ in todo))  # in grid order


def test_task_slots_follow_the_scarcest_resource():
    from wmbench.ray_executor import task_slots

    assert task_slots({"CPU": 2}, 1, 0) == 2
    assert task_slots({"CPU": 16, "GPU": 1}, 1, 1) == 1
    assert task_slots({"CPU": 1}, 4, 0) == 1  # a task larger than the cluster still gets one
    assert task_slots({"CPU": 8}, 0, 0) == 8


class _Nodes:
    """A stand-in for the ``ray`` module's ``nodes()``."""

    def __init__(self, *resources: dict[str, float]) -> None:
        self.resources = resources

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": r} for r in self.resources] + [{"Alive": False, "Resources": {"CPU": 64}}]


def test_a_task_no_node_fits_is_refused_on_a_private_instance_and_warned_on_a_cluster(caplog):
    """Ray waits forever for a node that can run a task: a run that started its own Ray (no
    autoscaler) says so at once (exit 2), a cluster (which may grow) gets a warning."""
    from wmbench.ray_executor import fits_no_node

    fits_no_node(_Nodes({"CPU": 2}), 2, 0, private=True)  # fits
    fits_no_node(_Nodes({"CPU": 8}, {"CPU": 4, "GPU": 1}), 4, 1, private=True)  # the second node fits
    with pytest.raises(ConfigError, match=r"no Ray node .*num_cpus 64.*largest node has 2 CPUs") as info:
        fits_no_node(_Nodes({"CPU": 2}), 64, 0, private=True)  # a dead node's 64 CPUs do not count
    assert info.value.field == "resources"
    with pytest.raises(ConfigError, match="num_gpus 1"):
        fits_no_node(_Nodes({"CPU": 16}), 1, 1, private=True)
    fits_no_node(_Nodes({"CPU": 2}), 64, 0, private=False)
    assert "waits until the cluster adds such a node" in caplog.text


def test_ray_workers_import_a_plugins_helpers_and_agree_on_its_cell_ids(tmp_path, local_ray, monkeypatch):
    """Each worker loads the plug-in again: its folder goes on the worker's module search path, and
    the helpers enter the worker's cell ids as they enter the driver's (a task finds its cell)."""
    from conftest import plugin_scenario
    from test_plugin_imports import write_plugin

    monkeypatch.setattr(sys, "path", [*sys.path])
    log = tmp_path / "calls.txt"
    plugin = write_plugin(tmp_path / "plugins", "ray", log)
    path = plugin_scenario(tmp_path, plugin, "none", "{name: counted_ray, strengths: [1.0]}", name="rayhelpers")
    assert main(["run", str(path), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lb"), "-q", "--executor", "ray"]) == 0
    frame = pd.read_csv(tmp_path / "lb" / "rayhelpers.csv")
    assert frame["failure"].isna().all() and "counted_ray" in set(frame["attack"])
    assert log.read_text().count("call") == 1  # run on a worker, with the helper it imports in a function


@pytest.mark.parametrize("address, answers", [("127.0.0.1:1", False), ("ray://127.0.0.1:1", False), ("auto", None), ("local", None), (None, None)])
def test_a_host_and_port_where_nothing_listens_is_found_before_ray_init(address, answers, monkeypatch):
    """ray.init retried an address where nothing listens for about 14 minutes before its error;
    a TCP connection tried first says so in seconds. Addresses that are not host:port are Ray's."""
    from wmbench.ray_executor import nothing_listens

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert (nothing_listens(address) is not None) == (answers is False)


def test_ray_at_an_address_where_nothing_listens_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process: this module's fixture may hold a local Ray
    (tmp_path / "s.yaml").write_text(SCENARIO)
    assert run(tmp_path, "ray", "--executor", "ray", "--address", "127.0.0.1:1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot connect to Ray at 127.0.0.1:1: nothing listens on 127.0.0.1 port 1" in err, err
