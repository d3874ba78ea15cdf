"""The command line: run, list, leaderboard; user errors are one line and exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_SCENARIO

from wmbench.cli import main
from wmbench.results import COLUMNS

ROOT = Path(__file__).parents[1]
TINY = TINY_SCENARIO.format(name="clitiny")


def test_run_writes_csv_markdown_and_plots(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 0
    frame = pd.read_csv(tmp_path / "lb" / "clitiny.csv")
    assert list(frame.columns) == COLUMNS and len(frame) == 4
    assert set(frame["statistic"]) == {"pearson_r"}  # each row names its method's detection statistic
    assert "| method" in (tmp_path / "lb" / "clitiny.md").read_text()
    assert {p.name for p in (tmp_path / "lb" / "clitiny").glob("*.png")} == {"small_cnn-digits-error.png", "small_cnn-digits-detect_stat.png"}
    # re-render from the published CSV
    assert main(["leaderboard", str(tmp_path / "lb" / "clitiny.csv"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "clitiny.md").read_text() == (tmp_path / "lb" / "clitiny.md").read_text()


def test_a_store_outside_the_cache_resumes_the_grid_on_a_fresh_cache(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY)
    store = tmp_path / "kept" / "clitiny.jsonl"  # e.g. under version control, between sessions
    run = ["run", str(tmp_path / "s.yaml"), "--store", str(store), "--out", str(tmp_path / "lb"), "-q"]
    assert main([*run, "--cache", str(tmp_path / "c1")]) == 0
    assert len(store.read_text().splitlines()) == 4
    assert not (tmp_path / "c1" / "results").exists()
    assert main([*run, "--cache", str(tmp_path / "c2"), "--dry-run"]) == 0
    assert "cells: 4 (4 done, 0 to run)" in capsys.readouterr().out
    first = (tmp_path / "lb" / "clitiny.csv").read_text()
    assert main([*run, "--cache", str(tmp_path / "c2")]) == 0
    assert not (tmp_path / "c2" / "models").exists()  # nothing retrained
    assert (tmp_path / "lb" / "clitiny.csv").read_text() == first


def test_list_shows_components_with_parameters(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "watermas" in out and "rho: float (>= 0) = 0.6" in out and "none" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(kind in out for kind in ("methods:", "attacks:", "models:", "datasets:"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nmethods: [none\n", "malformed YAML"),
        (TINY.replace("watermas", "watremas"), "did you mean: watermas"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, text, message):
    (tmp_path / "s.yaml").write_text(text)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_is_installed():
    exe = shutil.which("wmbench") or str(Path(sys.executable).with_name("wmbench"))
    out = subprocess.run([exe, "list", "attacks"], capture_output=True, text=True, check=True).stdout
    assert "noise" in out


def test_dry_run_prints_the_grid_and_runs_nothing(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY)
    args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main([*args, "--dry-run", "--set", "seeds=[0, 1]"]) == 0
    out = capsys.readouterr().out
    assert "cells: 8 (0 done, 8 to run)" in out and "trainings: 4 (0 cached, 4 to do;" in out
    assert not (tmp_path / "lb").exists() and not (tmp_path / "c" / "models").exists()
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--dry-run", "--set", "seeds=[0, 1]"]) == 0
    assert "trainings: 4 (2 cached, 2 to do;" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_dry_run_refuses_cuda_where_the_run_would(tmp_path, capsys):
    """--dry-run is the check before a long run: it fails where the run fails (a local run on cuda
    without a GPU), not with exit 0."""
    (tmp_path / "s.yaml").write_text(TINY)
    args = ["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--dry-run", "--device", "cuda"]
    assert main(args) == 2
    assert "device cuda requested but no CUDA GPU is available" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_no_error(monkeypatch, capsys):
    """`wmbench list | head`: the pipe closes mid-output; that ended with "wmbench: error: Broken pipe"."""
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list"]) == 0
    assert "error" not in capsys.readouterr().err


def test_leaderboard_accepts_quiet(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(TINY)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]) == 0
    csv = next((tmp_path / "lb").glob("*.csv"))
    assert main(["leaderboard", str(csv), "--out", str(tmp_path / "again"), "-q"]) == 0


def test_list_shows_no_range_for_a_true_false_field():
    """cifar_speednet's ``dirac`` and ``bn_weight`` (declared with ``bounded`` to mark them added)
    were listed as ``bool ((any finite value))``, though they take true or false only."""
    from wmbench.registry import MODELS, dataclass_params

    kinds = {name: kind for name, kind, _ in dataclass_params(MODELS.get("cifar_speednet"))}
    assert kinds["dirac"] == kinds["bn_weight"] == "bool" and kinds["head_scale"] == "float (> 0)"
