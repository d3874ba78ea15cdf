"""A figure of the leaderboard says how many seeds it rests on: a cell whose seed failed (exception
in training, attack or detection) is averaged over the seeds that ran, and its row in the Markdown
and HTML tables says so (`2 of 3 (1 failed; under 3 seeds)`), apart from a seed not run yet; the
CSV keeps the failed seed's row, `failure` filled, and reads back to the same tables."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from wmbench.leaderboard import attack_cells, read_results, render_markdown, summary_cells, write_leaderboard
from wmbench.report_html import render_html
from wmbench.results import to_frame
from wmbench.summary import summarize_frame

SEEDS = [0, 1, 2]
FIGURES = ["metric_value", "error", "error_clean", "error_delta", "error_unwatermarked", "detect_stat", "detect_pvalue",
           "detected", "train_s_per_epoch", "attack_s", "eval_s", "attack_effect", "detect_note"]


def rows(seeds: list[int] = SEEDS) -> list[dict]:
    """mark and none on one model, noise at 0 and 0.5, ``seeds``: every cell ran."""
    out = []
    for method in ("mark", "none"):
        for strength in (0.0, 0.5):
            for seed in seeds:
                marked = method == "mark"
                clean = 2.0 + 0.5 * seed
                error = clean + 4.0 * strength + seed
                out.append({
                    "scenario": "s", "model": "m", "dataset": "d", "method": method, "seed": seed, "attack": "noise",
                    "strength": strength, "metric": "accuracy", "metric_value": 1 - error / 100, "error": error,
                    "error_clean": clean, "error_delta": error - clean, "error_unwatermarked": clean,
                    "detect_stat": 0.9 - strength if marked else None, "detect_pvalue": 1e-9 if marked else None,
                    "detected": True if marked else None, "train_s_per_epoch": 1.0, "attack_s": 0.1, "eval_s": 0.1,
                    "wmbench_version": "0.1.0", "attack_effect": strength, "detect_note": None,
                    "statistic": "pearson_r" if marked else None,
                })
    return out


def failed(rows: list[dict], method: str, seed: int, strengths: tuple[float, ...], failure: str) -> list[dict]:
    """``rows`` with those cells failed as the runner records them: labels kept, figures empty."""
    out = []
    for r in rows:
        if r["method"] == method and r["seed"] == seed and r["strength"] in strengths:
            r = {**r, **{c: None for c in FIGURES}, "failure": failure}
        out.append(r)
    return out


def cell(frame: pd.DataFrame, method: str, strength: str) -> pd.Series:
    [group] = summarize_frame(frame)
    table = attack_cells(group, "noise")
    return table[(table["method"] == method) & (table["strength"] == strength)].iloc[0]


def test_a_cell_whose_seed_failed_says_it_rests_on_the_other_seeds(tmp_path: Path) -> None:
    frame = to_frame(failed(rows(), "mark", 2, (0.5,), "attack: KeyError: 'boom'"))
    row = cell(frame, "mark", "0.5")
    assert row["error (%)"].startswith("4.75 [")  # seeds 0 and 1: (4 + 5.5) / 2, as before
    assert row["detected"].startswith("2/2 ")
    assert row["seeds"] == "2 of 3 (1 failed; under 3 seeds)"
    assert cell(frame, "mark", "clean")["seeds"] == "3"  # its clean figures have every seed
    assert cell(frame, "none", "0.5")["seeds"] == "3"
    markdown = render_markdown(frame, "s")
    assert "| 2 of 3 (1 failed; under 3 seeds) |" in markdown
    assert "2 of 3 (1 failed; under 3 seeds)" in render_html(frame, "s")
    # the CSV keeps the failed seed's row, and the tables read back from it say the same
    write_leaderboard(frame, tmp_path, "s")
    csv = pd.read_csv(tmp_path / "s.csv")
    assert csv["failure"].notna().sum() == 1 and csv.loc[csv["failure"].notna(), "seed"].tolist() == [2]
    assert cell(read_results(tmp_path / "s.csv"), "mark", "0.5")["seeds"] == "2 of 3 (1 failed; under 3 seeds)"
    assert "| 2 of 3 (1 failed; under 3 seeds) |" in (tmp_path / "s.md").read_text()


def test_a_seed_not_run_yet_is_not_called_failed() -> None:
    frame = to_frame([r for r in rows() if not (r["method"] == "mark" and r["seed"] == 2 and r["strength"] == 0.5)])
    assert cell(frame, "mark", "0.5")["seeds"] == "2 of 3 (1 not run; under 3 seeds)"


def test_a_failed_training_shows_in_the_methods_seed_count() -> None:
    frame = to_frame(failed(rows(), "mark", 1, (0.0, 0.5), "training: FloatingPointError: loss is nan"))
    [group] = summarize_frame(frame)
    summary = summary_cells(group).set_index("method")
    assert summary.loc["mark", "seeds"] == "2 of 3 (1 failed; under 3 seeds)"
    assert summary.loc["none", "seeds"] == "3"
    assert cell(frame, "mark", "clean")["seeds"] == "2 of 3 (1 failed; under 3 seeds)"


def test_fewer_than_three_seeds_are_marked_and_three_are_not() -> None:
    assert cell(to_frame(rows([0])), "mark", "0.5")["seeds"] == "1 (under 3 seeds)"
    assert cell(to_frame(rows([0, 1])), "mark", "0.5")["seeds"] == "2 (under 3 seeds)"
    assert cell(to_frame(rows([0, 1, 2, 3])), "mark", "0.5")["seeds"] == "4"
    four = to_frame(failed(rows([0, 1, 2, 3]), "mark", 3, (0.5,), "detect: ValueError: x"))
    assert cell(four, "mark", "0.5")["seeds"] == "3 of 4 (1 failed)"
    legend = render_markdown(four, "s")
    assert re.search(r"`seeds`: how many seeds", legend)


def removed(rows: list[dict]) -> list[dict]:
    """``rows`` with mark's noise 0.5 removing the mark for 1 point of error."""
    out = []
    for r in rows:
        if r["method"] == "mark" and r["strength"] == 0.5:
            r = {**r, "error": r["error_clean"] + 1.0, "error_delta": 1.0, "detect_pvalue": 0.5, "detected": False}
        out.append(r)
    return out


def test_a_removal_resting_on_fewer_seeds_than_its_model_says_so() -> None:
    frame = to_frame([r for r in removed(rows()) if not (r["method"] == "mark" and r["seed"] in (1, 2) and r["strength"] == 0.5)])
    [group] = summarize_frame(frame)
    removal = {s.method: s for s in group.methods}["mark"].removals["noise"]
    assert removal.text() == "+1.00 at 0.5 (1 of 3 seeds: 2 not run, under 3 seeds)"
    summary = summary_cells(group).set_index("method")
    assert summary.loc["mark", "removed for < 2 pts by"] == "noise (+1.00 at 0.5 (1 of 3 seeds: 2 not run, under 3 seeds))"
    assert cell(frame, "mark", "0.5")["seeds"] == "1 of 3 (2 not run; under 3 seeds)"  # as its attack table row says
    assert "+1.00 at 0.5 (1 of 3 seeds: 2 not run, under 3 seeds)" in render_html(frame, "s")
    failed_seed = to_frame(failed(removed(rows()), "mark", 2, (0.5,), "attack: KeyError: 'boom'"))
    [group] = summarize_frame(failed_seed)
    assert {s.method: s for s in group.methods}["mark"].removals["noise"].text() == "+1.00 [+1.00, +1.00] at 0.5 (2 of 3 seeds: 1 failed, under 3 seeds)"
    [group] = summarize_frame(to_frame(removed(rows())))  # every seed: nothing added
    assert {s.method: s for s in group.methods}["mark"].removals["noise"].text() == "+1.00 [+1.00, +1.00] at 0.5"


def test_a_figure_missing_in_one_seeds_row_is_marked_with_the_seeds_it_rests_on(tmp_path: Path) -> None:
    """A hand-edited or foreign CSV with one seed's ``error`` empty: the row still rests on 3 seeds,
    but its error is the mean of 2 (error - clean != error_delta), so that figure says so."""
    edited = [{**r, "error": None} if (r["method"], r["seed"], r["strength"]) == ("mark", 2, 0.5) else r for r in rows()]
    edited = [{**r, "train_s_per_epoch": None} if (r["method"], r["seed"]) == ("none", 1) else r for r in edited]
    frame = to_frame(edited)
    row = cell(frame, "mark", "0.5")
    assert row["seeds"] == "3"
    assert row["error (%)"] == "4.75 [0.00, 14.28] (2 seeds)"  # (4 + 5.5) / 2
    assert row["error_delta"].startswith("+3.00 [") and "seeds)" not in row["error_delta"]  # all 3 seeds
    assert "seeds)" not in cell(frame, "mark", "clean")["error (%)"]
    [group] = summarize_frame(frame)
    summary = summary_cells(group).set_index("method")
    assert summary.loc["none", "train s/epoch"] == "1.00 [1.00, 1.00] (2 seeds)" and summary.loc["mark", "train s/epoch"] == "1.00 [1.00, 1.00]"
    assert "4.75 [0.00, 14.28] (2 seeds)" in render_html(frame, "s")
    markdown = render_markdown(frame, "s")
    assert "| 4.75 [0.00, 14.28] (2 seeds) |" in markdown and "A figure marked `(2 seeds)`" in markdown
    write_leaderboard(frame, tmp_path, "s")  # the CSV keeps the empty cell, and reads back to the same mark
    assert cell(read_results(tmp_path / "s.csv"), "mark", "0.5")["error (%)"] == "4.75 [0.00, 14.28] (2 seeds)"


def test_a_seed_whose_resync_failed_is_not_shown_as_a_resync_result() -> None:
    """A ``resync: true`` entry (wm+resync) whose resync could not run in a cell is detected plainly
    (wmbench.detection notes it): its detection and removal say so for those seeds, not as resync's."""
    from types import SimpleNamespace

    import torch

    from wmbench.api import Detection
    from wmbench.detection import detect

    method = SimpleNamespace(detect=lambda model, key: Detection(0.1, 0.5), carriers=lambda key: {})
    model = torch.nn.Linear(2, 2)
    *_, note = detect(method, model, None, 1e-6, reference=model, example=None)  # no example: the resync fails
    assert note.startswith("resync failed (ValueError: ")

    relabel = {"mark": "mark+resync"}
    table = [{**r, "method": relabel.get(r["method"], r["method"])} for r in removed(rows())]
    table = [{**r, "detect_note": note} if r["method"] == "mark+resync" and (r["seed"] in (0, 1) or r["strength"] == 0) else r for r in table]
    frame = to_frame(table)
    assert cell(frame, "mark+resync", "0.5")["detected"] == "0/3 [0%, 57%]; 2 resync failed"
    assert cell(frame, "mark+resync", "clean")["detected"] == "3/3 [43%, 100%]; 3 resync failed"
    assert cell(frame, "none", "0.5")["detected"] == "n/a"
    [group] = summarize_frame(frame)
    summary = summary_cells(group).set_index("method")
    assert summary.loc["mark+resync", "removed for < 2 pts by"] == "noise (+1.00 [+1.00, +1.00] at 0.5 (2 of 3 seeds resync failed))"
    assert summary.loc["mark+resync", "detected clean"] == "3/3 [43%, 100%]; 3 resync failed"
    assert "2 of 3 seeds resync failed" in render_html(frame, "s")
    assert "`resync failed`" in render_markdown(frame, "s")
    everywhere = to_frame([{**r, "detect_note": note} if r["method"] == "mark+resync" else r for r in table])
    [group] = summarize_frame(everywhere)
    assert {s.method: s for s in group.methods}["mark+resync"].removals["noise"].text(interval=False) == "+1.00 at 0.5 (resync failed)"

    from wmbench.summary import resync_failed  # the marker as wmbench.detection writes it, also after another note

    noted = f"the key's tensors found under 'module': detected in that submodule; {note}"
    assert resync_failed(pd.DataFrame({"detect_note": [note, noted, None, "resync failed", "detection not applicable: x"]})).tolist() == [True, True, False, False, False]
