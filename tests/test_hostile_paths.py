"""Hostile names: output names derived from a results file or labels never leave --out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wmbench.cli import main
from wmbench.leaderboard import write_leaderboard
from wmbench.names import safe_filename
from wmbench.results import to_frame

SPELLINGS = ["../../escaped", "/tmp/wmbench-hostile-abs/escaped", "..", ".", "", "a/../../escaped",
             "..\\..\\escaped", "nul\0escaped", "../" * 40 + "escaped", "é" * 200, "\n# heading"]


def row(**over) -> dict:
    base = {"scenario": "toy", "model": "mlp", "dataset": "digits", "method": "none", "seed": 0, "attack": "noise",
            "strength": 0.0, "metric": "accuracy", "metric_value": 0.9, "error": 10.0, "error_clean": 10.0}
    return {**base, **over}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("scenario, suffix", [
    ("../../escaped", ".csv"), ("/tmp/wmbench-hostile-abs/escaped", ".csv"), ("..", ".csv"),
    ("é" * 200, ".csv"), ("nul\0../escaped", ".jsonl"),
])
def test_leaderboard_names_from_the_results_file_stay_inside_out(tmp_path, scenario, suffix, capsys):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    results = work / f"results{suffix}"
    rows = [row(scenario=scenario), row(scenario=scenario, model="../../m/x", dataset="/abs")]
    if suffix == ".csv":
        to_frame(rows).to_csv(results, index=False)
    else:
        results.write_text("".join(json.dumps({"cell_id": str(i), **r}) + "\n" for i, r in enumerate(rows)))
    before = files_under(tmp_path)
    out = work / "out"
    control = "\0" in scenario  # rows whose labels hold control characters are skipped: none is left
    assert main(["leaderboard", str(results), "--out", str(out)]) == (2 if control else 0)
    written = files_under(tmp_path) - before
    assert (control or written) and all(p == out or out in p.parents for p in written), sorted(written)
    assert not Path("/tmp/wmbench-hostile-abs").exists()
    for path in capsys.readouterr().out.split():
        assert len(Path(path).name.encode()) <= 255


@pytest.mark.parametrize("name", ["../x", "/abs/x", "..", "", "a\\b", "x\0y"])
def test_write_leaderboard_refuses_a_name_that_is_not_a_plain_file_name(tmp_path, name):
    from wmbench.errors import WmbenchError

    with pytest.raises(WmbenchError, match="plain file names"):
        write_leaderboard(to_frame([row()]), tmp_path / "out", name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", SPELLINGS)
def test_safe_filename_is_one_plain_short_entry(text):
    name = safe_filename(text)
    assert name and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    assert not name.startswith(".") and len(name.encode()) <= 120
    assert Path(name).name == name


def test_plot_names_from_labels_stay_in_the_plots_folder(tmp_path):
    rows = [row(model="../../../evil" + "é" * 150, dataset="/etc/passwd"), row(model="..", dataset=".")]
    out = tmp_path / "out"
    paths = write_leaderboard(to_frame(rows), out, "toy")
    for path in paths:
        assert out in path.parents and len(path.name.encode()) <= 255
    assert paths[2] == out / "toy.html"
    assert {p.parent for p in paths[3:]} == {out / "toy"}  # the plots
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("command", ["run", "null", "curve"])
@pytest.mark.parametrize("out", ["afile", "afile/sub", "dangling", "dangling/sub", "loop"])
def test_an_out_that_is_not_a_folder_is_refused_before_any_work(tmp_path, capsys, command, out):
    """--out naming a file, a dangling or looping link (or a path below one) failed with "File
    exists" after the whole grid ran."""
    (tmp_path / "s.yaml").write_text("name: s\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [none]\n")
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    out = tmp_path / out
    assert main([command, str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(out), "-q"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing trained


@pytest.mark.parametrize("command", ["run", "null"])
@pytest.mark.parametrize("store", ["afile/x.jsonl", "afile/sub/x.jsonl", "dangling/x.jsonl", "loop/x.jsonl", "adir"])
def test_a_store_that_cannot_be_a_file_is_refused_before_any_work(tmp_path, capsys, command, store):
    """``--store afile/x.jsonl`` (afile a regular file) exited 4, as a fault of the machine, and
    the null found it only after all its draws: it is the user's path, exit 2 before any work."""
    (tmp_path / "s.yaml").write_text("name: s\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [none, watermas]\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    args = [command, str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--store", str(tmp_path / store), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--store {tmp_path / store}: " in err, err
    assert ("not a file" if store == "adir" else "is not a folder") in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("in_the_way", ["board.html/", "board.csv/", "board.md/", "board"])
def test_an_output_entry_in_the_way_is_refused_before_anything_is_written(tmp_path, capsys, in_the_way):
    """A folder where <name>.html goes, or a file where the plots' folder goes: one line and exit 2
    with nothing written (it was exit 4 after the .csv and .md were written, the .html not)."""
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"cell_id": f"c{s}", **row(seed=s)}) + "\n" for s in range(3)), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    blocker = out / in_the_way.rstrip("/")
    blocker.mkdir() if in_the_way.endswith("/") else blocker.write_text("mine")
    before = files_under(out)
    assert main(["leaderboard", str(source), "--out", str(out), "--name", "board"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker) in err and "in the way" in err, err
    assert files_under(out) == before


def test_run_refuses_an_output_in_the_way_before_any_training(tmp_path, capsys, monkeypatch):
    """``wmbench run``: checked after the scenario is read, not when the grid is done."""
    from conftest import TINY_SCENARIO

    import wmbench.runner as runner

    monkeypatch.setattr(runner.Runner, "run", lambda *a, **k: pytest.fail("the grid ran"))
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="tiny"))
    (tmp_path / "out" / "tiny.html").mkdir(parents=True)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny.html is a folder" in err, err


def test_curve_refuses_an_output_in_the_way_before_any_training(tmp_path, capsys, monkeypatch):
    from conftest import TINY_SCENARIO

    import wmbench.curve as curve

    monkeypatch.setattr(curve, "accuracy_time_curve", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="tiny"))
    (tmp_path / "out" / "tiny_curve.csv").mkdir(parents=True)
    assert main(["curve", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny_curve.csv is a folder" in err, err


def test_null_refuses_an_output_in_the_way_before_any_key_is_drawn(tmp_path, capsys, monkeypatch):
    from conftest import TINY_SCENARIO

    import wmbench.null as null

    monkeypatch.setattr(null, "run_null", lambda *a, **k: pytest.fail("drew keys"))
    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="tiny"))
    (tmp_path / "out" / "tiny_null.md").mkdir(parents=True)
    assert main(["null", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "-q", "--keys", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny_null.md is a folder" in err, err


@pytest.mark.parametrize(("out", "why"), [
    ("dangling", "a symbolic link to {tmp}/nowhere, which does not exist"),
    ("dangling/sub", "a symbolic link to {tmp}/nowhere, which does not exist"),
    ("loop", "a symbolic link to {tmp}/loop, which loops"),
    ("afile", ""),
])
def test_an_out_that_is_a_broken_link_says_so(tmp_path, capsys, out, why):
    """``leaderboard --out`` naming a dangling or looping link said only "dangling is not a folder",
    as of a file: the message says it is a link and where it leads."""
    write_leaderboard(to_frame([row(), row(seed=1)]), tmp_path / "src", "toy")
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert main(["leaderboard", str(tmp_path / "src" / "toy.csv"), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / out.split('/')[0]} is not a folder{': ' if why else ''}{why.format(tmp=tmp_path)}" in err, err


def test_a_plots_folder_that_is_a_dangling_link_says_so(tmp_path, capsys):
    """``<out>/<name>`` (the plots' folder) a dangling link: "is not a folder" did not say it is a link."""
    write_leaderboard(to_frame([row(), row(seed=1)]), tmp_path / "src", "toy")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "out" / "toy")
    assert main(["leaderboard", str(tmp_path / "src" / "toy.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / 'toy'} is not a folder: a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in err, err
