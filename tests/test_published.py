"""Every published leaderboard and curve Markdown under leaderboard/ is what wmbench renders from the
CSV beside it: a figure cannot be edited by hand, nor go stale when the renderer changes, without
this failing (re-render with ``wmbench leaderboard CSV --out DIR --name NAME``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from wmbench.curve import write_curve
from wmbench.leaderboard import _read_table, render_markdown

PUBLISHED = Path(__file__).resolve().parent.parent / "leaderboard"
LEADERBOARDS = sorted(p.with_suffix(".csv") for p in PUBLISHED.rglob("*.html"))  # a page: a published leaderboard
CURVES = sorted(PUBLISHED.rglob("*_curve.csv"))


def _id(path: Path) -> str:
    return str(path.relative_to(PUBLISHED))


@pytest.mark.parametrize("csv", LEADERBOARDS, ids=_id)
def test_published_leaderboard_markdown_is_its_csv_rendered(csv: Path) -> None:
    assert render_markdown(_read_table(csv), csv.stem) == csv.with_suffix(".md").read_text(encoding="utf-8")


@pytest.mark.parametrize("csv", CURVES, ids=_id)
def test_published_curve_markdown_is_its_csv_rendered(csv: Path, tmp_path: Path) -> None:
    _, md = write_curve(pd.read_csv(csv), tmp_path, csv.name.removesuffix("_curve.csv"))
    assert md.read_text(encoding="utf-8") == csv.with_suffix(".md").read_text(encoding="utf-8")


def test_there_is_something_to_check() -> None:
    assert len(LEADERBOARDS) >= 10 and len(CURVES) >= 20
