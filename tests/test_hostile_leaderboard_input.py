"""`wmbench leaderboard` on a file that is not a results table: exit 2, one line, nothing written."""

from __future__ import annotations

import shutil

import pytest

from wmbench.cli import main

CASES = {
    "binary.csv": None,  # /bin/ls, copied
    "scenario.yaml": "name: x\nseeds: [0]\ndatasets: [digits]\nmodels: [small_cnn]\nmethods: [none]\n",
    "other.csv": "a,b,c\n1,2,3\n",
    "empty.csv": "",
    "ragged.csv": 'scenario,model\n"unterminated,1\n',
    "foreign.jsonl": '{"a": 1}\n[1, 2]\n"text"\n',
    "binary.jsonl": None,
}


@pytest.mark.parametrize("name", list(CASES))
def test_not_a_results_file_is_one_line_and_exit_2(tmp_path, capsys, name):
    path = tmp_path / name
    if CASES[name] is None:
        shutil.copyfile(shutil.which("ls") or "/bin/ls", path)
    else:
        path.write_text(CASES[name])
    assert main(["leaderboard", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmbench: error:") and err.count("\n") == 1 and str(path) in err
    assert not (tmp_path / "out").exists()


def test_bin_ls_itself(tmp_path, capsys):
    assert main(["leaderboard", "/bin/ls", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, why", [("/dev/null", "not a regular file"), ("/nonexistent/results.csv", "no such results file")])
def test_a_path_that_is_no_results_file_says_which_kind(tmp_path, capsys, path, why):
    assert main(["leaderboard", path, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"wmbench: error: {path}: {why}\n"
