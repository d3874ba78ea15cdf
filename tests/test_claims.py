"""leaderboard/claims.py: the figures it prints are the leaderboard's, duplicate rows included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wmbench.leaderboard import write_leaderboard
from wmbench.results import to_frame

SCRIPT = Path(__file__).resolve().parents[1] / "leaderboard" / "claims.py"


def test_two_rows_of_one_seed_are_one_sample_as_in_the_leaderboard(tmp_path):
    """A cell with two rows for seed 0 (a re-run appended): averaged within the seed, never counted
    as a fourth seed (which narrowed the interval and gave detection 3/4)."""
    rows = []
    for seed in (0, 1, 2):
        for strength, delta, detected in ((0.0, 0.0, True), (0.5, 5.0 + seed, True)):
            rows.append({"scenario": "s", "model": "m", "dataset": "d", "method": "mark", "seed": seed, "attack": "noise",
                         "strength": strength, "metric": "accuracy", "metric_value": 0.9, "error": 10.0 + delta, "error_clean": 10.0,
                         "error_delta": delta, "detect_stat": 0.9, "detect_pvalue": 1e-9, "detected": detected, "wmbench_version": "0.1.0"})
    rows.append({**rows[1], "error": 25.0, "error_delta": 15.0, "detected": False})  # seed 0 again, noise 0.5
    write_leaderboard(to_frame(rows), tmp_path, "board")
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "board.csv")], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("m/d noise 0.5 mark"))
    assert "delta 7.67 [" in line and "detected 2/3" in line, line  # seeds 10 (5 and 15 averaged), 6, 7
    assert "| +7.67 [+2.50, +12.84] | 0.900 [0.900, 0.900] | -9.0 [-9.0, -9.0] | 2/3 [20%, 94%]" in (tmp_path / "board.md").read_text()


@pytest.mark.parametrize(("name", "text", "why"), [
    ("board.csv", "", "no header"),
    ("board.csv", "scenario,model,dataset,method,seed,attack,strength\n", "no result row"),
    ("board.csv", "scenario,model,dataset,method,attack,strength\ns,m,d,x,noise,0\n", "no column seed"),
    ("board_null.csv", "", "No columns"),
    ("board_null.csv", "method,attack\nx,clean\n", "no column"),
    ("board_null.csv", "method,attack,strength,null_n,null_fp,fpr_p01,tpr_fpr1,tpr_threshold\nx,noise,0.5,10,0,0.1,1,1\n", "no clean row"),
    ("board_null.csv", "method,attack,strength,null_n,null_fp,fpr_p01,tpr_fpr1,tpr_threshold\nx,clean,0,ten,0,0.1,1,1\n", "null_n"),
    ("board_curve.csv", "a,b\n1,2\n", "no column"),
    ("board_curve.csv", "model,epoch,train_minutes,metric_value\nm,1,x,0.5\n", "train_minutes"),
    ("board_curve.csv", "\xff\xfe", "not UTF-8"),
    ("missing.csv", None, "no such file"),
    ("missing_null.csv", None, "no such file"),
])
def test_a_file_claims_cannot_read_is_one_line_and_exit_2(tmp_path, name, text, why):
    """An empty CSV, one without a column claims needs, a null without its clean row or a value
    that is no number: a traceback (EmptyDataError, KeyError 'model', IndexError), now one line."""
    path = tmp_path / name
    if text is not None:
        path.write_bytes(text.encode("latin-1"))
    done = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"claims.py: error: {path}: ") and why.lower() in done.stderr.lower(), done.stderr
