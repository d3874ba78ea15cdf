"""Spreadsheet and Markdown injection: labels reach the CSV as text (OWASP: a leading ' before
= + - @ tab CR) and read back unchanged; | and line breaks cannot break the Markdown tables."""

from __future__ import annotations

import csv
import re

import pytest

from wmbench.leaderboard import read_results, write_leaderboard
from wmbench.names import control_chars, csv_cell, csv_uncell
from wmbench.results import to_frame

pytestmark = pytest.mark.filterwarnings("ignore:Glyph")  # tab and CR have no glyph in plot legends
EVIL = ['=HYPERLINK("http://evil","x")', "+1+1", "-2+3", "@SUM(A1:A9)", "\tcmd", "\rcmd", "'quoted", "a|b", "x\n# injected heading"]


def rows() -> list[dict]:
    out = []
    for i, label in enumerate(EVIL):
        out.append([{"scenario": "inj", "model": "m|x", "dataset": "d", "method": label, "seed": 0, "attack": "noise|x",
                    "strength": strength, "metric": "accuracy", "metric_value": 0.9, "error": 10.0 + i, "error_clean": 10.0 + i}
                    for strength in (0.0, 1.0)])
    return [r for group in out for r in group]


def test_csv_cells_are_never_formulas_and_round_trip(tmp_path):
    frame = to_frame(rows())
    write_leaderboard(frame, tmp_path, "inj")
    with open(tmp_path / "inj.csv", newline="", encoding="utf-8") as fh:
        cells = [c for row in csv.reader(fh) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c.startswith("-") and not re.fullmatch(r"-[0-9.e+-]+", c))]
    back = read_results(tmp_path / "inj.csv")
    # Labels holding a tab, a CR or a newline (a scenario refuses them) are skipped on reading, with a
    # warning, never rendered again; every other label reads back as written.
    printable = [e for e in EVIL if not control_chars(e)]
    assert len(printable) == len(EVIL) - 3 and sorted(back["method"].unique()) == sorted(printable)
    write_leaderboard(back, tmp_path / "again", "inj")  # write -> read -> write is a fixed point
    write_leaderboard(to_frame([r for r in rows() if r["method"] in printable]), tmp_path / "printable", "inj")
    assert (tmp_path / "again" / "inj.csv").read_bytes() == (tmp_path / "printable" / "inj.csv").read_bytes()


def test_csv_escape_is_exactly_reversible():
    for text in [*(e for e in EVIL if "\r" not in e), "plain", "''=x", "'", "", "-", "\nx", "'\nx"]:
        assert csv_uncell(csv_cell(text)) == text


def test_markdown_tables_keep_their_shape(tmp_path):
    write_leaderboard(to_frame(rows()), tmp_path, "inj")
    text = (tmp_path / "inj.md").read_text(encoding="utf-8")
    assert not [line for line in text.splitlines() if line.startswith("# injected")]
    for table in re.findall(r"(?:^\|.*\n)+", text, flags=re.M):
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(widths) == 1, table
    assert "a\\|b" in text and "noise\\|x" in text


TEX = ["$\\alpha_$", "$\\undefinedcmd$", "$x^2$", "a$b"]  # mathtext: two broken, one that would render as x squared


def test_dollar_signs_in_labels_are_plotted_as_written(tmp_path):
    """matplotlib reads text between two $ as mathtext: a label such as ``$\\alpha_$`` (a scenario
    accepts it) ended a finished run with a ValueError traceback while plotting (no HTML page
    written), and ``$x^2$`` was drawn as x squared. Plots now show every label's characters."""
    from matplotlib.text import Text

    frame = to_frame([{"scenario": "tex", "model": "$m$", "dataset": "d", "method": label, "seed": 0, "attack": attack,
                       "strength": strength, "metric": "accuracy", "metric_value": 0.9, "error": 10.0, "error_clean": 10.0}
                      for label in TEX for attack in ("$\\frac{1}{$", "noise") for strength in (0.0, 1.0)])
    drawn: list[Text] = []
    original = Text.draw
    try:
        Text.draw = lambda self, renderer: (drawn.append(self), original(self, renderer))[1]  # type: ignore[method-assign]
        paths = write_leaderboard(frame, tmp_path, "tex")
    finally:
        Text.draw = original  # type: ignore[method-assign]
    assert (tmp_path / "tex.html").exists() and len([p for p in paths if p.suffix == ".png"]) == 2
    shown = {t.get_text() for t in drawn}
    assert {*TEX, "$\\frac{1}{$"} <= shown and all(not t.get_parse_math() for t in drawn if "$" in t.get_text())
