"""Leaderboard rendering: CSV schema and round trip, Markdown pivots, plots, byte-stable output."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from wmbench.leaderboard import normalize, read_results, render_markdown, sort_rows, write_leaderboard
from wmbench.plots import detection_figure, error_figure, plot_leaderboard
from wmbench.results import COLUMNS, judge, to_frame
from wmbench.summary import detection_threshold, summarize_group

METHODS = ["none", "watermas"]
ATTACKS = {"noise": [0.0, 0.01, 0.05], "prune": [0.0, 0.3, 0.6]}
SEEDS = [0, 1]


def synthetic_rows() -> list[dict]:
    """2 methods x 2 attacks x 3 strengths x 2 seeds; the unwatermarked method has no detection statistic."""
    rows = []
    for method in METHODS:
        for attack, strengths in ATTACKS.items():
            for level, strength in enumerate(strengths):
                for seed in SEEDS:
                    marked = method != "none"
                    clean = 2.0 + 0.5 * marked + 0.5 * seed
                    error = clean + (3.0 + 0.1 * seed) * level
                    stat = 0.99 - 0.2 * level - 0.01 * seed if marked else None
                    rows.append({
                        "scenario": "toy", "model": "mlp", "dataset": "mnist", "method": method, "seed": seed,
                        "attack": attack, "strength": strength, "metric": "accuracy",
                        "metric_value": 1 - error / 100, "error": error, "error_clean": clean,
                        "error_delta": error - clean, "error_unwatermarked": 2.0 + 0.5 * seed,
                        "detect_stat": stat, "detect_pvalue": 1e-12 if marked else None,
                        "detected": stat > 0.585 if marked else None,
                        "train_s_per_epoch": 1.5 + marked, "attack_s": 0.01, "eval_s": 0.02,
                        "wmbench_version": "0.1.0", "attack_effect": strength / 3,
                        "detect_note": "" if marked else "no key: detection not applicable",
                    })
    return rows


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return to_frame(synthetic_rows())


@pytest.fixture(scope="module")
def rendered(frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("board")
    return out, write_leaderboard(frame, out, "toy")


def test_csv_has_columns_in_order_and_round_trips(frame: pd.DataFrame, rendered: tuple[Path, list[Path]]) -> None:
    out, _ = rendered
    header = (out / "toy.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.split(",") == COLUMNS
    back = read_results(out / "toy.csv")
    assert list(back.columns) == COLUMNS
    pd.testing.assert_frame_equal(back, sort_rows(normalize(frame)), check_exact=False, rtol=1e-5)


def test_jsonl_store_reads_back_without_cell_id_and_torn_lines(frame: pd.DataFrame, tmp_path: Path) -> None:
    rows = synthetic_rows()
    lines = [json.dumps({"cell_id": f"c{i}", **row}) for i, row in enumerate(rows)]
    lines.insert(3, lines[3][:40])  # a torn line sealed by a later append
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:25], encoding="utf-8")
    back = read_results(tmp_path / "results.jsonl")
    assert list(back.columns) == COLUMNS
    assert len(back) == len(rows)
    judge(rows, 1e-6)  # a store's verdicts are judged at the threshold (the synthetic ones follow the statistic)
    pd.testing.assert_frame_equal(sort_rows(back), sort_rows(normalize(to_frame(rows))))


def test_a_store_read_back_gets_the_unwatermarked_error_of_its_seed(tmp_path: Path) -> None:
    """A store's rows carry no error_unwatermarked (the runner joins it): re-rendering a store
    joins it from the method labelled none, per model, dataset and seed, and leaves it empty
    where that seed's unwatermarked training is missing."""
    rows = [{k: v for k, v in row.items() if k != "error_unwatermarked"} for row in synthetic_rows()]
    rows = [row for row in rows if not (row["method"] == "none" and row["seed"] == 1)]
    (tmp_path / "store.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    back = read_results(tmp_path / "store.jsonl")
    marked = back[back["method"] == "watermas"]
    assert set(marked.loc[marked["seed"] == 0, "error_unwatermarked"]) == {2.0}
    assert marked.loc[marked["seed"] == 1, "error_unwatermarked"].isna().all()


def test_markdown_has_a_table_per_attack_and_seed_means(frame: pd.DataFrame, rendered: tuple[Path, list[Path]]) -> None:
    out, _ = rendered
    text = (out / "toy.md").read_text(encoding="utf-8")
    assert text.startswith("# wmbench leaderboard: toy")
    assert "## mlp / mnist (metric: accuracy)" in text
    headers = [line for line in text.splitlines() if line.startswith("| method") and "| strength" in line]
    assert len(headers) == 2 and [c.strip() for c in headers[0].strip("|").split("|")] == [
        "method", "strength", "seeds", "error (%)", "error_delta", "detect_stat", "log10 p", "detected",
    ]
    assert text.index("### noise") < text.index("### prune")
    # the unwatermarked method, clean: seeds 2.0 and 2.5, t interval [-0.93, 5.43] cut at an error's 0
    assert "| 2.25 [0.00, 5.43] " in text
    summary = next(line for line in text.splitlines() if line.startswith("| watermas") and "Pearson r" in line)
    assert "| 2.75 [0.00, 5.93] " in summary and "| +0.50 [+0.50, +0.50] " in summary and "| 2/2 [34%, 100%] " in summary


def test_markdown_shows_t_intervals_and_wilson_counts(frame: pd.DataFrame, rendered: tuple[Path, list[Path]]) -> None:
    """watermas under prune 0.6: error 8.5 and 9.2 over two seeds, detected in one of them."""
    out, _ = rendered
    text = (out / "toy.md").read_text(encoding="utf-8")
    prune = text[text.index("### prune"):]
    row = next(line for line in prune.splitlines() if line.startswith("| watermas ") and "| 0.6 " in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    cell = frame[(frame["method"] == "watermas") & (frame["attack"] == "prune") & (frame["strength"] == 0.6)]
    errors = cell.sort_values("seed")["error"].to_numpy()
    low, high = stats.t.interval(0.95, 1, loc=errors.mean(), scale=stats.sem(errors))
    assert cells[2] == "2 (under 3 seeds)"  # the seeds the figures rest on
    assert cells[3] == f"{errors.mean():.2f} [{low:.2f}, {high:.2f}]"
    assert cells[5].startswith(f"{cell['detect_stat'].mean():.3f} [")
    assert cells[6] == "-12.0 [-12.0, -12.0]"  # log10 of the p-value 1e-12 (this frame has no detect_log10_p)
    assert cells[7] == "1/2 [9%, 91%]"  # Wilson 95% interval of 1/2 is [0.0945, 0.9055]


def test_intervals_stop_where_the_quantity_does(frame: pd.DataFrame) -> None:
    """Over 3 seeds the t intervals of a bit accuracy of 0.97, 1.0, 1.0, a log10 p of -0.1, -0.5,
    -2.0 and errors of 0.5, 0.5, 3.0 pass 1, 0 and 0: each is cut to the values its quantity can
    take; a z score's is not cut."""
    def t_interval(values: list[float]) -> tuple[float, float]:
        return stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))

    seeds = {"stat": [0.97, 1.0, 1.0], "log10_p": [-0.1, -0.5, -2.0], "error": [0.5, 0.5, 3.0]}
    clean = frame[(frame["method"] == "watermas") & (frame["seed"] == 0) & (frame["strength"] == 0)]
    bits = pd.concat([
        clean.assign(seed=seed, detect_stat=stat, detect_log10_p=log10_p, detect_pvalue=10**log10_p,
                     error=error, error_clean=error, error_unwatermarked=error)
        for seed, (stat, log10_p, error) in enumerate(zip(*seeds.values()))
    ]).assign(statistic="bit_accuracy")
    cell = summarize_group(normalize(bits)).methods[0].clean
    free = {name: t_interval(values) for name, values in seeds.items()}
    assert free["stat"][1] > 1 and free["log10_p"][1] > 0 and free["error"][0] < 0
    assert (cell.stat.low, cell.stat.high) == (pytest.approx(free["stat"][0]), 1.0)
    assert (cell.log10_p.low, cell.log10_p.high) == (pytest.approx(free["log10_p"][0]), 0.0)
    assert (cell.error.low, cell.error.high) == (0.0, pytest.approx(free["error"][1]))
    assert f"| 1.33 [0.00, {free['error'][1]:.2f}] " in render_markdown(sort_rows(normalize(bits)), "bits")
    z = summarize_group(normalize(bits.assign(statistic="z_score"))).methods[0].clean
    assert z.stat.high == pytest.approx(free["stat"][1])


def test_markdown_log10_p_is_finite_where_the_pvalue_underflows(frame: pd.DataFrame) -> None:
    tiny = frame.assign(detect_pvalue=lambda f: f["detect_pvalue"] * 0.0, detect_log10_p=lambda f: f["detect_pvalue"] * 0 - 400.0)
    text = render_markdown(sort_rows(normalize(tiny)), "tiny")
    assert "| -400.0 [-400.0, -400.0] |" in text


def test_legend_names_each_methods_statistic(frame: pd.DataFrame) -> None:
    bits = frame.assign(method=frame["method"].replace({"none": "uchida"}))
    text = render_markdown(sort_rows(normalize(bits)), "bits")
    assert "| uchida   | bit accuracy (null 0.5) |" in text and "| watermas | Pearson r (null 0) " in text


def test_statistic_comes_from_the_rows_then_from_the_method_label(frame: pd.DataFrame) -> None:
    """A label naming no registered method takes the statistic its rows carry; rows without one
    (older CSVs) fall back to the registered method the label names, e.g. hufunet's z score."""
    labelled = frame.assign(method=frame["method"].replace({"none": "hufunet", "watermas": "rho0.6-lam0.1"}))
    labelled["statistic"] = np.where(labelled["method"] == "rho0.6-lam0.1", "bit_accuracy", None)
    text = render_markdown(sort_rows(normalize(labelled)), "labels")
    assert "| rho0.6-lam0.1 | bit accuracy (null 0.5) |" in text
    assert "| hufunet       | z score (null 0)        |" in text
    unknown = render_markdown(sort_rows(normalize(labelled.assign(statistic=None))), "labels")
    assert "| rho0.6-lam0.1 | not declared " in unknown


def test_a_statistic_this_version_does_not_know_is_shown_as_the_rows_name_it(frame: pd.DataFrame) -> None:
    """Rows of a registered label carrying a statistic this wmbench does not know (a newer
    version's) showed the registry's statistic instead (watermas: "Pearson r"), silently; a method
    with none showed "?", said nowhere. Now the rows' name, marked, and "not declared"."""
    from wmbench.report_html import render_html

    odd = frame.assign(statistic=np.where(frame["method"] == "watermas", "cosine", ""), method=frame["method"].replace({"none": "myplug"}))
    text = render_markdown(sort_rows(normalize(odd)), "odd")
    assert "| watermas | cosine (null unknown) |" in text and "| myplug   | not declared          |" in text, text
    page = render_html(sort_rows(normalize(odd)), "odd")
    assert "<td>cosine (null unknown)</td>" in page and "<td>not declared</td>" in page


def test_every_builtin_method_names_a_known_statistic() -> None:
    from wmbench.registry import METHODS
    from wmbench.statistic_kinds import STATISTICS

    builtin = [n for n in METHODS.names() if METHODS.get(n).__module__.startswith(METHODS.builtin_module)]
    assert {"none", "watermas", "hufunet"} <= set(builtin)
    missing = [n for n in builtin if getattr(METHODS.get(n), "statistic", "") not in STATISTICS]
    assert not missing


def test_plots_are_valid_pngs(rendered: tuple[Path, list[Path]]) -> None:
    out, paths = rendered
    pngs = sorted(p.name for p in paths if p.suffix == ".png")
    assert pngs == ["mlp-mnist-detect_stat.png", "mlp-mnist-error.png"]
    assert all(p.is_file() for p in paths) and (out / "toy" / "mlp-mnist-error.png") in paths
    for name in pngs:
        with Image.open(out / "toy" / name) as image:
            image.verify()
        with Image.open(out / "toy" / name) as image:
            assert image.format == "PNG" and image.width > 0 and image.height > 0


def test_rendering_is_byte_stable(frame: pd.DataFrame, rendered: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out, _ = rendered
    shuffled = frame.sample(frac=1.0, random_state=3)
    again = write_leaderboard(shuffled, tmp_path / "a", "toy")
    reread = write_leaderboard(read_results(out / "toy.csv"), tmp_path / "b", "toy")
    for suffix in (".csv", ".md", ".html"):
        first = (out / f"toy{suffix}").read_bytes()
        assert (tmp_path / "a" / f"toy{suffix}").read_bytes() == first
        assert (tmp_path / "b" / f"toy{suffix}").read_bytes() == first
    assert len(again) == len(reread) == 5
    assert not list(tmp_path.rglob("*.tmp"))


def test_awkward_frames_still_plot(frame: pd.DataFrame, tmp_path: Path) -> None:
    """One method only, an attack with a single strength, no detection statistic at all, big strengths."""
    odd = frame[frame["method"] == "none"].copy()
    odd.loc[odd["attack"] == "prune", "strength"] = 0.0
    quantize = odd[odd["attack"] == "noise"].assign(attack="quantize", strength=lambda f: f["strength"] * 320)
    odd = pd.concat([odd, quantize], ignore_index=True)
    odd["detect_stat"] = np.nan
    paths = [p for group in plot_leaderboard(odd, tmp_path).values() for p in group]
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
    written = write_leaderboard(odd, tmp_path / "board", "odd")
    text = (tmp_path / "board" / "odd.md").read_text(encoding="utf-8")
    assert "### quantize" in text and "| 16 " in text
    assert len(written) == 5


def test_plots_separate_statistics_with_chance_levels_threshold_and_log_counts(frame: pd.DataFrame) -> None:
    """A bit method (uchida) beside a Pearson one, and key_leak counts spanning two decades."""
    mixed = frame.assign(method=frame["method"].replace({"none": "uchida"}))
    mixed.loc[mixed["method"] == "uchida", "detect_stat"] = 0.9
    leak = mixed[mixed["attack"] == "noise"].assign(attack="key_leak", strength=lambda f: f["strength"].map({0.0: 0.0, 0.01: 16.0, 0.05: 1024.0}))
    mixed = normalize(pd.concat([mixed, leak], ignore_index=True)).assign(neg_log10_p=12.0)
    methods = ["uchida", "watermas"]
    figure = detection_figure(mixed, "mlp / mnist", methods, 1e-6)
    visible = [a for a in figure.axes if a.get_visible()]
    assert {a.get_ylabel() for a in visible} == {"bit accuracy", "Pearson r", "-log10 p"}
    for axis in visible:
        flat = {round(float(l.get_ydata()[0]), 6) for l in axis.get_lines()
                if l.get_label() not in methods and len(set(map(float, l.get_ydata()))) == 1}  # horizontal lines
        expected = {"bit accuracy": 0.5, "Pearson r": 0.0, "-log10 p": 6.0}[axis.get_ylabel()]
        assert expected in flat  # chance level, or the detection threshold as -log10 p
        labels = [t.get_text() for t in axis.get_xticklabels()]
        assert labels[0] == "clean" and "0" not in labels  # clean at its own tick, not strength 0
        method_lines = {l.get_label() for l in axis.get_lines() if l.get_label() in methods}
        assert method_lines == ({"uchida"} if axis.get_ylabel() == "bit accuracy" else {"watermas"} if axis.get_ylabel() == "Pearson r" else set(methods))
    key_leak = [a for a in visible if a.get_title() == "key_leak"]
    column = [a for a in visible if _column_of(a) == _column_of(key_leak[0])]
    assert len(column) == 3 and all(a.get_xscale() == "log" for a in column)  # counts 16 and 1024
    assert all(a.get_xscale() == "linear" for a in visible if a.get_title() == "prune")
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "band: min to max over seeds" in legend and "chance (no watermark)" in legend
    styles = {l.get_label(): (l.get_linestyle(), l.get_marker(), l.get_markerfacecolor()) for a in visible for l in a.get_lines()}
    assert styles["uchida"] != styles["watermas"]
    assert error_figure(mixed, "mlp / mnist", methods).axes


def _column_of(axis) -> int:
    return axis.get_subplotspec().colspan.start


def test_detection_threshold_is_inferred_from_the_verdicts(frame: pd.DataFrame) -> None:
    """The CSV does not store the threshold: the default 1e-6 where the verdicts agree with it."""
    marked = normalize(frame[frame["method"] == "watermas"].head(4)).assign(detected=[True, True, False, False])
    assert detection_threshold(marked.assign(detect_log10_p=[-9.0, -12.0, -3.0, -5.5])) == 1e-6
    assert detection_threshold(marked.assign(detect_log10_p=[-9.0, -12.0, -3.0, -7.5])) == 1e-8
    assert detection_threshold(marked.assign(detect_log10_p=[-2.0, -12.0, -3.0, -7.5])) is None
    # a threshold of 1e-300 judged rows down to log10 p -710, and a hand-edited +1e308: no
    # threshold a float can hold is inferred (10 ** -709 is 0, and log10(0) crashed every render)
    assert detection_threshold(marked.assign(detect_log10_p=[-710.0, -800.0, -3.0, -7.0])) is None
    assert detection_threshold(marked.assign(detect_log10_p=[1e308, 1e308, 1e308, 1e308])) is None
    write_leaderboard(marked.assign(detect_log10_p=[-710.0, -800.0, -3.0, -7.0]), Path(tempfile.mkdtemp()), "tiny")


def test_every_rendered_figure_is_recomputable_from_the_csv(tmp_path: Path) -> None:
    # a figure whose 7th digit decides its 2-decimal rendering: 2.344999 shows 2.34, while the
    # CSV keeps 6 digits (2.345, which shows 2.35): the Markdown must show what the CSV gives
    rows = [{**r, "error": r["error_clean"] + 2.344999, "error_delta": 2.344999} if r["strength"] else r for r in synthetic_rows()]
    write_leaderboard(to_frame(rows), tmp_path / "a", "toy")
    assert "+2.35" in (tmp_path / "a" / "toy.md").read_text() and "+2.34 " not in (tmp_path / "a" / "toy.md").read_text()
    write_leaderboard(read_results(tmp_path / "a" / "toy.csv"), tmp_path / "b", "toy")
    assert (tmp_path / "a" / "toy.md").read_text() == (tmp_path / "b" / "toy.md").read_text()


def test_labels_that_look_like_html_show_as_written_in_markdown(frame: pd.DataFrame) -> None:
    """A label is text: ``<b>mlp</b>`` or ``<script>`` must not become markup in a Markdown viewer, and
    an entity must not become its character; ``< 2`` (not a tag) and ``a & b`` stay readable."""
    from wmbench.names import md_cell

    odd = frame.assign(model="<b>mlp</b>", attack=frame["attack"].replace({"noise": "noise <script>alert(1)</script>"}),
                       method=frame["method"].replace({"watermas": "wm &amp; co"}))
    text = render_markdown(odd, "toy")
    assert "<b>" not in text and "<script>" not in text and "&amp;amp;" in text
    assert "## &lt;b>mlp&lt;/b> / mnist" in text and "### noise &lt;script>alert(1)&lt;/script>" in text
    assert md_cell("removed for < 2 pts by a & b") == "removed for < 2 pts by a & b"


def test_control_and_bidi_characters_in_failures_show_as_escapes_in_markdown(frame: pd.DataFrame) -> None:
    """An exception's message in ``failure`` (or a ``detect_note``) may hold a terminal escape or a
    bidi override, which would colour a terminal's or reorder a viewer's text: the Markdown shows
    them as their escapes; the CSV keeps the text as it was."""
    from wmbench.names import control_chars, md_cell

    odd = frame.copy()
    odd["failure"] = None
    odd.loc[0, "failure"] = "attack: RuntimeError: \x1b[31mboom\u202e)lanif(\tdone\x00"
    text = render_markdown(odd, "toy")
    assert not control_chars(text.replace("\n", ""))
    assert "attack: RuntimeError: \\x1b[31mboom\\u202e)lanif(\\x09done\\x00" in text
    assert md_cell("a\u200fb\U000e0041c") == "a\\u200fb\\U000e0041c"
    assert md_cell("line\nbreak | pipe") == "line break \\| pipe"  # as before


def test_labels_that_look_like_markdown_links_or_images_show_as_written(frame: pd.DataFrame) -> None:
    """``[x](javascript:...)`` must not become a link, nor ``![](https://...)`` an image a Markdown
    viewer fetches when the page is opened (the HTML page's CSP forbids it; Markdown has none)."""
    odd = frame.assign(model="![p](https://tracker.example/p.png)",
                       method=frame["method"].replace({"watermas": "[wm](javascript:alert(1))"}))
    text = render_markdown(odd, "toy")
    assert "](" not in text, [line for line in text.splitlines() if "](" in line][:3]
    assert "## ![p]\\(https://tracker.example/p.png) / mnist" in text and "| [wm]\\(javascript:alert(1)) " in text
    assert "[0." in text  # intervals stay as written


def test_a_rerender_removes_the_plots_of_groups_no_longer_in_the_grid(frame: pd.DataFrame, tmp_path: Path) -> None:
    """A model removed from the grid left its plots beside the new ones; files wmbench did not name stay."""
    two = pd.concat([frame, frame.assign(model="cnn")], ignore_index=True)
    write_leaderboard(two, tmp_path, "toy")
    (tmp_path / "toy" / "notes.png").write_bytes(b"mine")
    assert {p.name for p in (tmp_path / "toy").glob("*.png")} >= {"cnn-mnist-error.png", "mlp-mnist-error.png"}
    written = write_leaderboard(frame, tmp_path, "toy")
    left = {p.name for p in (tmp_path / "toy").glob("*.png")}
    assert left == {p.name for p in written if p.suffix == ".png"} | {"notes.png"}
    assert not any(name.startswith("cnn-") for name in left)


def test_markdown_says_what_the_rows_were_measured_with(frame: pd.DataFrame) -> None:
    """Device and torch threads head the Markdown as they head the page (runs compare only at equal ones)."""
    text = render_markdown(frame.assign(device="cpu AMD EPYC", torch_threads=2.0), "toy")
    assert "scenario: toy; wmbench version: 0.1.0;" in text and "device: cpu AMD EPYC; torch threads: 2" in text.split("\n\n")[1]


@pytest.mark.parametrize(("label", "escaped"), [
    ("a`<b>`c", "a\\`&lt;b>\\`c"),  # a code span would hide the backticks and show "&lt;b>" as written
    ("p*q*r", "p\\*q\\*r"),  # emphasis
    ("a~~b~~", "a\\~\\~b\\~\\~"),  # strikethrough
    ("_x_ and a__init__", "\\_x\\_ and a\\_\\_init\\_\\_"),  # emphasis; "key_leak-removal" stays as it is
    ("key_leak-removal", "key_leak-removal"),
    ("a\\|b", "a\\\\\\|b"),  # the backslash shows: it would escape the next character
    ("C:\\Users\\x", "C:\\Users\\x"),  # a backslash before a letter is shown as it is
])
def test_labels_with_markdown_emphasis_or_code_show_as_written(label: str, escaped: str) -> None:
    """A backtick in a label (or an exception's message in ``failure``) made a code span of what
    followed: the backticks vanished and an escaped ``&lt;`` inside showed literally; ``*`` and ``~``
    made emphasis and strikethrough. Each such character is backslash-escaped."""
    from wmbench.names import md_cell

    assert md_cell(label) == escaped


def test_the_at_chance_note_escapes_labels_and_keeps_its_own_code(frame: pd.DataFrame) -> None:
    """The note under a summary whose clean model is at chance names the methods: their labels are
    escaped as table cells are (the page made code of a label's backticks), its own `detect_note`
    stays code."""
    odd = frame.assign(method=frame["method"].replace({"watermas": "wm`x`*y*"}),
                       detect_note="clean model at chance accuracy (test)")
    text = render_markdown(odd, "toy")
    note = next(line for line in text.splitlines() if line.startswith("At chance:"))
    assert "wm\\`x\\`\\*y\\* (" in note and "(see `detect_note`)" in note, note
    from wmbench.report_html import render_html

    page = render_html(odd, "toy")
    assert "wm`x`*y* (2 of" in page and "(see <code>detect_note</code>)" in page  # not wm<code>x</code>


def test_the_runs_threads_and_epochs_are_listed_in_numeric_order(frame: pd.DataFrame) -> None:
    """Rows of 2 and 16 torch threads, 8 and 15 epochs read "torch threads: 16, 2", "training
    epochs: 15, 8" (text order)."""
    from wmbench.summary_text import run_meta

    mixed = frame.assign(device="cpu", torch_threads=np.where(frame["seed"] == 0, 2, 16), epochs=np.where(frame["seed"] == 0, 15, 8))
    meta = run_meta(normalize(mixed))
    assert "training epochs: 8, 15;" in meta and "torch threads: 2, 16" in meta, meta
