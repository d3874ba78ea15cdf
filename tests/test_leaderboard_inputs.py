"""`wmbench leaderboard` on awkward but readable input: labels whose plot names clash, rows that
cannot be read (skipped with a warning), combined scenarios (a warning) and truncated CSVs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from wmbench.cli import main
from wmbench.leaderboard import read_results, write_leaderboard
from wmbench.null_report import watermarked_stats
from wmbench.plots import plot_stems
from wmbench.results import to_frame

Capture = pytest.CaptureFixture[str]
Logs = pytest.LogCaptureFixture


def rows(models: tuple[str, ...] = ("mlp",), datasets: tuple[str, ...] = ("digits",), scenario: str = "s") -> list[dict[str, Any]]:
    """Per model and dataset: methods none and mark x noise at 0 and 0.1 x 2 seeds."""
    out = []
    for model in models:
        for dataset in datasets:
            for method in ("none", "mark"):
                for strength in (0.0, 0.1):
                    for seed in (0, 1):
                        error = 2.0 + seed + 10 * strength
                        out.append({
                            "scenario": scenario, "model": model, "dataset": dataset, "method": method, "seed": seed,
                            "attack": "noise", "strength": strength, "metric": "accuracy", "metric_value": 1 - error / 100,
                            "error": error, "error_clean": 2.0 + seed, "error_delta": 10 * strength,
                            "detect_stat": 0.9 - strength if method == "mark" else None,
                            "detect_pvalue": 1e-9 if method == "mark" else None,
                            "detected": method == "mark", "wmbench_version": "0.1.0",
                        })
    return out


def sections(html: str) -> dict[str, list[str]]:
    """Section heading (``model / dataset``) -> the plot files its figures name."""
    out = {}
    for section in html.split("<section ")[1:]:
        heading = re.search(r"<h2>(.*?) \(metric", section)
        if heading:
            out[heading.group(1)] = re.findall(r"<figcaption>[^<]*\(([^<)]*\.png)\)</figcaption>", section)
    return out


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"cell_id": f"c{i}", **row}) + "\n" for i, row in enumerate(items)), encoding="utf-8")
    return path


def leaderboard(path: Path, out: Path, capsys: Capture) -> tuple[int, str]:
    code = main(["leaderboard", str(path), "--out", str(out), "--name", "board"])
    return code, capsys.readouterr().err


# 1. plot file names


def test_labels_that_slug_alike_get_their_own_plots(tmp_path: Path) -> None:
    written = write_leaderboard(to_frame(rows(models=("α", "β"))), tmp_path, "board")
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(pngs) == 4 and len({p.name for p in pngs}) == 4
    assert len({p.read_bytes() for p in pngs}) == 4  # none overwritten by another group's figure
    found = sections((tmp_path / "board.html").read_text(encoding="utf-8"))
    assert set(found) == {"α / digits", "β / digits"}
    assert len(found["α / digits"]) == 2 and not set(found["α / digits"]) & set(found["β / digits"])


def test_a_section_embeds_exactly_its_own_plots(tmp_path: Path) -> None:
    written = write_leaderboard(to_frame(rows(models=("cnn", "cnn-d"), datasets=("d", "x"))), tmp_path, "board")
    found = sections((tmp_path / "board.html").read_text(encoding="utf-8"))
    assert found["cnn / d"] == ["board/cnn-d-error.png", "board/cnn-d-detect_stat.png"]
    every = [name for names in found.values() for name in names]
    assert len(every) == 8 and len(set(every)) == 8  # each plot in one section only
    assert {p.name for p in written if p.suffix == ".png"} == {name.split("/")[1] for name in every}


def test_plot_stems_are_unique_and_plain_labels_keep_their_names() -> None:
    stems = plot_stems([("mlp", "mnist"), ("cnn-d", "x"), ("cnn", "d-x"), ("CNN", "y"), ("cnn", "y"), ("α", "d"), ("β", "d")])
    assert stems[("mlp", "mnist")] == "mlp-mnist"  # published names unchanged
    assert len({s.casefold() for s in stems.values()}) == len(stems)
    assert stems[("cnn-d", "x")].startswith("cnn-d-x-") and stems[("α", "d")].startswith("_-d-")
    assert plot_stems([("α", "d")]) == {("α", "d"): stems[("α", "d")]}  # a lossy slug always carries its hash


# 2. rows whose identity cannot be read


@pytest.mark.parametrize("seed", ["inf", "1e30", "-inf", "nan", "x", ""])
def test_a_csv_seed_that_is_no_integer_skips_the_row(tmp_path: Path, capsys: Capture, caplog: Logs, seed: str) -> None:
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    lines = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8").splitlines()
    fields = lines[1].split(",")
    fields[4] = seed
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(lines) - 2


@pytest.mark.parametrize("field, value", [
    ("seed", 1e300), ("seed", [1]), ("seed", 10**400), ("seed", True), ("seed", 1.5), ("strength", [1]), ("strength", "high"), ("model", [1]),
], ids=["seed-1e300", "seed-list", "seed-10**400", "seed-true", "seed-1.5", "strength-list", "strength-text", "model-list"])
def test_a_jsonl_row_of_the_wrong_type_is_skipped(tmp_path: Path, capsys: Capture, caplog: Logs, field: str, value: Any) -> None:
    good = rows()
    path = write_jsonl(tmp_path / "store.jsonl", [*good, {**good[0], field: value}])
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(good)


@pytest.mark.parametrize("column", ["method", "model", "attack", "scenario"])
@pytest.mark.parametrize("char", ["\x1b[31m", "\u202e", "\r", "\n", "\x00", "\u2028"], ids=["escape", "bidi", "cr", "lf", "nul", "line-sep"])
def test_a_csv_label_holding_control_characters_is_skipped_not_copied(
    tmp_path: Path, capsys: Capture, caplog: Logs, column: str, char: str,
) -> None:
    """A scenario refuses such labels at load; a CSV edited elsewhere may hold them all the same:
    its row is skipped with a warning, never copied into the re-rendered CSV, Markdown or page
    (a terminal escape, a right-to-left override or a line break in a label was written verbatim)."""
    import csv

    write_leaderboard(to_frame(rows(scenario="scen")), tmp_path / "a", "board")
    with open(tmp_path / "a" / "board.csv", encoding="utf-8", newline="") as fh:
        table = list(csv.reader(fh))
    index = table[0].index(column)
    label = table[-1][index]
    table[-1][index] = edited = label[:1] + char + label[1:]
    path = tmp_path / "edited.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(table)
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text and f"{column} " in caplog.text and "control characters" in caplog.text
    for written in (tmp_path / "out").iterdir():
        if written.is_file():
            text = written.read_bytes().decode("utf-8")
            assert edited not in text and edited.replace("\r", "\n") not in text, written.name
            assert char in "\r\n" or char not in text, written.name
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(table) - 2


def test_an_unreadable_later_row_does_not_hide_its_cells_good_row(tmp_path: Path, capsys: Capture) -> None:
    """Last row per cell wins among readable rows only: a bad re-write of a cell keeps its good row."""
    good = [{**row, "cell_id": f"c{i}"} for i, row in enumerate(rows())]
    path = write_jsonl(tmp_path / "store.jsonl", [*good, {**good[0], "seed": "zero"}, {**good[1], "strength": [1]}])
    code, _ = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and len(read_results(tmp_path / "out" / "board.csv")) == len(good)


def test_a_jsonl_of_unreadable_rows_only_is_refused(tmp_path: Path, capsys: Capture) -> None:
    path = write_jsonl(tmp_path / "store.jsonl", [{**row, "seed": 1e300} for row in rows()])
    code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 2 and err.startswith(f"wmbench: error: {path}: not a results file (no result row)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value", [("strength", [1]), ("strength", "high"), ("seed", [1]), ("detect_stat", [1]), ("detect_pvalue", "low"), ("attack", None)])
def test_the_null_report_skips_rows_of_the_wrong_type(caplog: Logs, field: str, value: Any) -> None:
    good = [row for row in rows() if row["method"] == "mark"]
    bad = {**good[-1], field: value}
    if value is None:
        del bad[field]
    with caplog.at_level(logging.WARNING):
        stats = watermarked_stats([*good, bad, {**bad, "scenario": "other"}], "s")
    assert stats == watermarked_stats(good, "s")
    assert "skipped 1 result rows" in caplog.text


# 3. combined results


def test_combined_scenarios_are_kept_with_a_warning(tmp_path: Path, capsys: Capture, caplog: Logs) -> None:
    path = write_jsonl(tmp_path / "store.jsonl", [*rows(scenario="first"), *rows(scenario="second")])
    with caplog.at_level(logging.WARNING):
        code, _ = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and len(read_results(tmp_path / "out" / "board.csv")) == 2 * len(rows())
    assert "rows of 2 scenarios are combined: 'first', 'second'" in caplog.text
    assert "different results" not in caplog.text


def test_one_cell_with_different_results_warns(tmp_path: Path, capsys: Capture, caplog: Logs) -> None:
    twice = [*rows(), {**rows()[0], "error": 50.0}]
    path = write_jsonl(tmp_path / "store.jsonl", twice)
    with caplog.at_level(logging.WARNING):
        code, _ = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "1 cell has rows with different results" in caplog.text
    assert "scenarios are combined" not in caplog.text


def test_identical_duplicates_and_other_timings_do_not_warn(tmp_path: Path, capsys: Capture, caplog: Logs) -> None:
    twice = [*rows(), {**rows()[0]}, {**rows()[1], "train_s_per_epoch": 9.0}]
    path = write_jsonl(tmp_path / "store.jsonl", twice)
    with caplog.at_level(logging.WARNING):
        code, _ = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and caplog.text == ""


# 4. truncated CSVs


def test_a_csv_cut_mid_row_drops_the_torn_row(tmp_path: Path, capsys: Capture, caplog: Logs) -> None:
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    text = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8")
    path = tmp_path / "cut.csv"
    path.write_text(text[: text.rindex(",noise,") + 4], encoding="utf-8")  # "...,noi"
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text and "(a row cut short?)" in caplog.text
    back = read_results(tmp_path / "out" / "board.csv")
    assert set(back["attack"]) == {"noise"} and len(back) == len(rows()) - 1


@pytest.mark.parametrize("column", ["detect_pvalue", "wmbench_version", "error"])
def test_a_csv_cut_after_its_identity_drops_the_torn_row(tmp_path: Path, capsys: Capture, caplog: Logs, column: str) -> None:
    """A row cut inside a later column (a p-value 2.3e-10 read as "2.") has a readable identity but
    not all its fields: skipped, never rendered with the cut value or with empty trailing columns."""
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    lines = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8").splitlines()
    index = lines[0].split(",").index(column)
    cut = ",".join(lines[-1].split(",")[:index] + [lines[-1].split(",")[index][:2]])
    path = tmp_path / "cut.csv"
    path.write_text("\n".join([*lines[:-1], cut]), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text and "(a row cut short?)" in caplog.text
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(lines) - 2


@pytest.mark.parametrize("column, value, why", [
    ("detect_pvalue", "2", "detect_pvalue 2.0 is outside [0.0, 1.0]"),
    ("error", "-3", "error -3.0 is outside [0.0, 100.0]"),
    ("detect_stat", "high", "detect_stat is not a number"),
    ("detected", "maybe", "detected is not a boolean"),
    # rendered as "inf", "+inf" or "2.4 [2.2, 0.0]" (a mean above its own interval) before they were checked
    ("detect_stat", "inf", "detect_stat inf is outside"),
    ("detect_log10_p", "5", "detect_log10_p 5.0 is outside [-inf, 0.0]"),
    ("detect_log10_p", "inf", "detect_log10_p inf is outside [-inf, 0.0]"),
    ("error_delta", "inf", "error_delta inf is outside [-100.0, 100.0]"),
    ("error_delta", "-150", "error_delta -150.0 is outside [-100.0, 100.0]"),
    ("error_unwatermarked", "101", "error_unwatermarked 101.0 is outside [0.0, 100.0]"),
    ("train_s_per_epoch", "-inf", "train_s_per_epoch -inf is outside"),
    ("attack_s", "-1", "attack_s -1.0 is outside"),
    ("seed", "-1", "seed -1.0 is negative"),  # a scenario's seeds and strengths are >= 0: shown as a row "-0.3" before
    ("strength", "-0.3", "strength -0.3 is negative"),
])
def test_a_complete_csv_row_with_an_impossible_value_is_skipped(
    tmp_path: Path, capsys: Capture, caplog: Logs, column: str, value: str, why: str,
) -> None:
    """A CSV row is checked as a .jsonl row is: types and ranges, not only its identity."""
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    lines = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8").splitlines()
    fields = lines[-1].split(",")
    fields[lines[0].split(",").index(column)] = value
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([*lines[:-1], ",".join(fields)]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text and why in caplog.text
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(lines) - 2


def test_a_csv_row_run_into_the_next_is_skipped_not_the_whole_file(tmp_path: Path, capsys: Capture, caplog: Logs) -> None:
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    lines = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "joined.csv"
    path.write_text("\n".join([*lines[:-2], lines[-2] + "," + lines[-1]]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "Traceback" not in err
    assert f"{path}: skipped 1 result rows" in caplog.text and "(a row cut short?)" not in caplog.text
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(lines) - 3


def test_a_csv_cut_inside_its_header_is_refused(tmp_path: Path, capsys: Capture) -> None:
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    text = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8")
    path = tmp_path / "cut.csv"
    path.write_text(text[: text.index("metric_value") + 3], encoding="utf-8")  # "...,strength,metric,met"
    code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 2 and err == f"wmbench: error: {path}: not a results file (no result row)\n"
    assert not (tmp_path / "out").exists()


def test_a_threshold_with_a_csv_is_refused_not_ignored(tmp_path: Path, capsys: Capture) -> None:
    """A CSV keeps the verdicts it was published with: an explicit --threshold would change nothing."""
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    code = main(["leaderboard", str(tmp_path / "a" / "board.csv"), "--out", str(tmp_path / "out"), "--threshold", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--threshold judges a .jsonl results store's rows again; board.csv is a CSV" in err, err
    assert not (tmp_path / "out").exists()
    store = write_jsonl(tmp_path / "store.jsonl", rows())
    assert main(["leaderboard", str(store), "--out", str(tmp_path / "out"), "--name", "store", "--threshold", "1e-12"]) == 0
    assert not read_results(tmp_path / "out" / "store.csv")["detected"].any()  # p 1e-9 is not below 1e-12


def test_a_method_without_any_verdict_is_not_said_to_survive_every_attack(tmp_path: Path) -> None:
    """No clean verdict (detection not applicable everywhere): its removal column is n/a, not "none"
    (which reads as: no attack removes it)."""
    from wmbench.leaderboard import summary_cells
    from wmbench.summary import summarize_frame

    unread = [{**r, "detect_stat": None, "detect_pvalue": None, "detected": None} if r["method"] == "mark" else r for r in rows()]
    [group] = summarize_frame(to_frame(unread))
    table = summary_cells(group).set_index("method")
    removed = [c for c in table.columns if c.startswith("removed for")][0]
    assert table.loc["mark", "detected clean"] == "n/a" and table.loc["mark", removed] == "n/a"


@pytest.mark.parametrize("edit", ["missing words", "spreadsheet columns", "long field"])
def test_what_other_tools_leave_in_a_csv_is_read(tmp_path: Path, capsys: Capture, edit: str) -> None:
    """A CSV through R or pandas (nan, NA for missing values), a spreadsheet (two empty trailing
    columns of the same blank name), a failure message of 200,000 characters: read, every row kept."""
    write_leaderboard(to_frame(rows()), tmp_path / "a", "board")
    lines = (tmp_path / "a" / "board.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    if edit == "missing words":
        none_row = next(i for i, line in enumerate(lines) if ",none," in line)
        fields = lines[none_row].split(",")
        fields[header.index("detect_pvalue")], fields[header.index("detected")], fields[header.index("detect_stat")] = "nan", "NA", "NaN"
        lines[none_row] = ",".join(fields)
    elif edit == "spreadsheet columns":
        lines = [line + ",," for line in lines]
    else:
        fields = lines[1].split(",")
        fields[header.index("failure")] = "x" * 200_000
        lines[1] = ",".join(fields)
    path = tmp_path / "edited.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(read_results(path)) == len(lines) - 1


def test_a_store_finds_the_unwatermarked_reference_by_method_name_whatever_its_label(tmp_path: Path) -> None:
    """`wmbench leaderboard store.jsonl` took only the label none as the reference: with
    ``{name: none, label: unwm}`` every row's error_unwatermarked (imperceptibility) was n/a, while
    the run's own CSV had them. A stored row records its method's name; a row without one (an older
    store) still counts by the label none."""
    named = [{**r, "method": "unwm" if r["method"] == "none" else r["method"], "method_name": "none" if r["method"] == "none" else "mark"} for r in rows()]
    frame = read_results(write_jsonl(tmp_path / "named.jsonl", named))
    assert list(frame["error_unwatermarked"]) == [2.0 + seed for seed in frame["seed"]]
    old = read_results(write_jsonl(tmp_path / "old.jsonl", rows()))  # no method_name: the label none
    assert list(old["error_unwatermarked"]) == [2.0 + seed for seed in old["seed"]]
    mislabelled = [{**r, "method_name": "mark"} for r in rows()]  # a watermark labelled none is no reference
    assert read_results(write_jsonl(tmp_path / "mislabelled.jsonl", mislabelled))["error_unwatermarked"].isna().all()


def test_a_store_renders_the_imperceptibility_the_run_did(tmp_path: Path) -> None:
    import textwrap

    from conftest import TINY_SCENARIO

    from wmbench.runner import Runner
    from wmbench.scenario import load_scenario

    path = tmp_path / "unwm.yaml"
    path.write_text(textwrap.dedent(TINY_SCENARIO.format(name="unwm")).replace("methods: [none, ", "methods: [{name: none, label: unwm}, "))
    store = tmp_path / "store.jsonl"
    ran = Runner(load_scenario(path), tmp_path / "cache", progress=False, store=store).run()
    assert ran["error_unwatermarked"].notna().all()
    read = read_results(store)
    key = ["method", "seed", "attack", "strength"]
    assert read.sort_values(key)["error_unwatermarked"].tolist() == ran.sort_values(key)["error_unwatermarked"].tolist()


def test_a_log10_p_of_minus_infinity_is_kept(tmp_path: Path, capsys: Capture, caplog: Logs) -> None:
    """Rows written before the log tail (a p-value of 0, log10 -inf: published stores hold them)
    are read, not skipped as out of range."""
    items = rows()
    for row in items:
        if row["method"] == "mark":
            row.update(detect_pvalue=0.0, detect_log10_p=-float("inf"))
    path = write_jsonl(tmp_path / "old.jsonl", items)
    with caplog.at_level(logging.WARNING):
        code, err = leaderboard(path, tmp_path / "out", capsys)
    assert code == 0 and "skipped" not in caplog.text, caplog.text
    assert len(read_results(tmp_path / "out" / "board.csv")) == len(items)


def test_rows_without_a_scenario_are_named_after_the_file(tmp_path: Path, capsys: Capture) -> None:
    """An empty scenario column (a hand-made CSV): the outputs take the file's name, not 'None'."""
    items = [{**row, "scenario": None} for row in rows()]
    path = write_jsonl(tmp_path / "mine.jsonl", items)
    assert main(["leaderboard", str(path), "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["mine", "mine.csv", "mine.html", "mine.md"], written
    assert (tmp_path / "out" / "mine.md").read_text(encoding="utf-8").startswith("# wmbench leaderboard: mine\n")
