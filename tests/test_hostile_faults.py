"""Faults of the machine (a path through a regular file, a read-only folder, a full disk): one line
naming the path and the cause, exit code 4 (EXIT_SYSTEM), and no temporary file or folder left behind."""

from __future__ import annotations

import errno
import os

import pytest

from wmbench.cli import EXIT_SYSTEM, main

SCENARIO = """
name: fault
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 200}}]
models: [{name: small_cnn, args: {width: 4, hidden: 8}}]
methods: [{name: none, args: {n_carriers: 64}}]
training: {epochs: 1}
"""


def leftovers(root):
    return [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def one_line(err: str, *needles: str) -> None:
    assert err.startswith("wmbench: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def scenario(tmp_path):
    (tmp_path / "s.yaml").write_text(SCENARIO)
    (tmp_path / "file").write_text("a regular file")
    return tmp_path / "s.yaml"


def test_cache_through_a_regular_file(tmp_path, scenario, capsys):
    assert main(["run", str(scenario), "--cache", str(tmp_path / "file" / "cache"), "-q"]) == EXIT_SYSTEM
    one_line(capsys.readouterr().err, str(tmp_path / "file"), "Not a directory")


def test_wmbench_cache_env_through_dev_null(tmp_path, scenario, capsys, monkeypatch):
    monkeypatch.setenv("WMBENCH_CACHE", "/dev/null/x")
    assert main(["run", str(scenario), "-q"]) == EXIT_SYSTEM
    one_line(capsys.readouterr().err, "/dev/null")


def test_leaderboard_out_through_a_regular_file(tmp_path, capsys):
    results = tmp_path / "r.csv"
    results.write_text("scenario,model,dataset,method,seed,attack,strength\ns,m,d,none,0,noise,0\n")
    (tmp_path / "file").write_text("x")
    assert main(["leaderboard", str(results), "--out", str(tmp_path / "file" / "out")]) == 2  # the argument's fault, said before any work
    one_line(capsys.readouterr().err, str(tmp_path / "file"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    results = tmp_path / "r.csv"
    results.write_text("scenario,model,dataset,method,seed,attack,strength\ns,m,d,none,0,noise,0\n")
    out = tmp_path / "out"
    out.mkdir(mode=0o500)
    try:
        assert main(["leaderboard", str(results), "--out", str(out)]) == EXIT_SYSTEM
        one_line(capsys.readouterr().err, str(out), "Permission denied")
    finally:
        out.chmod(0o700)
    assert not leftovers(out)


@pytest.mark.at_chance("plumbing: a full disk's error")
def test_full_disk_while_storing_a_model(tmp_path, scenario, capsys, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if len(data) > 256:  # checkpoints and rows; tiny writes still pass
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    cache = tmp_path / "cache"
    assert main(["run", str(scenario), "--cache", str(cache), "--out", str(tmp_path / "lb"), "-q"]) == EXIT_SYSTEM
    one_line(capsys.readouterr().err, str(cache), "No space left")
    assert not leftovers(cache / "models")
    assert not (tmp_path / "lb").exists()
    monkeypatch.undo()
    # The rerun after the disk is freed finishes the grid.
    assert main(["run", str(scenario), "--cache", str(cache), "--out", str(tmp_path / "lb"), "-q"]) == 0


@pytest.fixture
def unwritable(tmp_path):
    """A folder no write can enter, even as root (chattr +i); skipped where chattr is refused."""
    import shutil
    import subprocess

    folder = tmp_path / "locked"
    folder.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], capture_output=True)


@pytest.mark.parametrize("command", ["run", "curve", "null", "embed"])
def test_an_unwritable_output_folder_stops_before_any_training(tmp_path, capsys, monkeypatch, unwritable, command):
    """A read-only --out (or embed's output folder): exit 4 and one line naming the folder before
    anything is trained; it was found when the results were written (embed's os_random training,
    never cached, was lost with it)."""
    from conftest import TINY_SCENARIO

    import wmbench.curve as curve
    import wmbench.null as null
    import wmbench.worker as worker

    for target, name in ((worker.CellWorker, "trained"), (curve, "accuracy_time_curve"), (null, "run_null")):
        monkeypatch.setattr(target, name, lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="tiny"))
    common = [str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "-q"]
    if command == "embed":
        argv = ["embed", *common, "--out-model", str(unwritable / "m.safetensors"), "--out-key", str(tmp_path / "k.key")]
    else:
        argv = [command, *common, "--out", str(unwritable / "sub"), *(["--keys", "2"] if command == "null" else [])]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{unwritable}: " in err, err
    assert list(unwritable.iterdir()) == [] and not (tmp_path / "k.key").exists()


@pytest.mark.parametrize("name", ["models", "locks", "partial", "results", "datasets"])
def test_a_file_in_place_of_a_cache_folder_stops_the_run_before_any_work(tmp_path, scenario, capsys, name):
    """``<cache>/models`` or ``<cache>/locks`` as a file failed every cell on FileExistsError
    (exit 3, after trying each), and ``partial`` trained with a warning per checkpoint: now the run
    stops first, naming the path, as for a cache through a file (exit 4)."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / name).write_text("in the way")
    assert main(["run", str(scenario), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == EXIT_SYSTEM
    one_line(capsys.readouterr().err, str(tmp_path / "c" / name), "Not a directory")
    assert not (tmp_path / "lb").exists() or not any((tmp_path / "lb").iterdir())


@pytest.mark.parametrize("where", ["", "models", "results", "datasets"])
@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_cache_or_cache_folder_that_is_a_broken_link_stops_the_run_before_any_work(tmp_path, scenario, capsys, monkeypatch, where, link):
    """``--cache LINK`` with LINK a dangling link trained the first cell, then failed on "LINK: File
    exists" (the results store's mkdir); ``<cache>/models`` as a dangling link said "Not a
    directory". Now: exit 4 before any work, one line naming the link and what is wrong with it."""
    import wmbench.worker as worker

    monkeypatch.setattr(worker.CellWorker, "trained", lambda *a, **k: pytest.fail("work started"))
    cache = tmp_path / "c"
    path = cache / where if where else cache
    path.parent.mkdir(exist_ok=True)
    target = tmp_path / "nowhere" if link == "dangling" else path
    os.symlink(target, path)
    assert main(["run", str(scenario), "--cache", str(cache), "--out", str(tmp_path / "lb"), "-q"]) == EXIT_SYSTEM
    err = capsys.readouterr().err
    reason = "which does not exist" if link == "dangling" else "which loops"
    one_line(err, f"{path}: a symbolic link to {target}, {reason}")
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize("where", ["", "curves"])
def test_a_curve_whose_cache_is_a_broken_link_stops_before_training(tmp_path, scenario, capsys, monkeypatch, where):
    """``wmbench curve --cache LINK`` (dangling) trained every seed, warned that it could not keep
    its points (File exists) and exited 0; now exit 4 before any training, as ``run`` does."""
    import wmbench.curve as curve

    monkeypatch.setattr(curve, "load_seeded", lambda *a, **k: pytest.fail("work started"))
    cache = tmp_path / "c"
    path = cache / where if where else cache
    path.parent.mkdir(exist_ok=True)
    os.symlink(tmp_path / "nowhere", path)
    assert main(["curve", str(scenario), "--cache", str(cache), "--out", str(tmp_path / "lb"), "-q"]) == EXIT_SYSTEM
    one_line(capsys.readouterr().err, f"{path}: a symbolic link to {tmp_path / 'nowhere'}, which does not exist")


@pytest.mark.parametrize("sub", ["", "sub"])
def test_leaderboard_into_an_unwritable_folder_names_the_folder(tmp_path, capsys, unwritable, sub):
    """``wmbench leaderboard --out`` a read-only folder named a temporary file the user never asked
    for (``locked/.s.csv.x1y2.tmp: Operation not permitted``): now the folder, as ``run`` does."""
    results = tmp_path / "r.csv"
    results.write_text("scenario,model,dataset,method,seed,attack,strength\ns,m,d,none,0,noise,0\n")
    assert main(["leaderboard", str(results), "--out", str(unwritable / sub)]) == EXIT_SYSTEM
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{unwritable}: " in err, err
    assert list(unwritable.iterdir()) == []
