"""Leaderboard rendering: CSV schema and round trip, Markdown pivots, plots, byte-stable output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wmbench.leaderboard import normalize, read_results, sort_rows, write_leaderboard
from wmbench.plots import plot_leaderboard
from wmbench.results import COLUMNS, to_frame

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
    pd.testing.assert_frame_equal(sort_rows(back), sort_rows(normalize(frame)))


def test_markdown_has_a_table_per_attack_and_seed_means(frame: pd.DataFrame, rendered: tuple[Path, list[Path]]) -> None:
    out, _ = rendered
    text = (out / "toy.md").read_text(encoding="utf-8")
    assert text.startswith("# wmbench leaderboard: toy")
    assert "## mlp / mnist (metric: accuracy)" in text
    headers = [line for line in text.splitlines() if line.startswith("| method") and "clean error" not in line]
    assert [[c.strip() for c in h.strip("|").split("|")] for h in headers] == [
        ["method", "clean", "0.01", "0.05"], ["method", "clean", "0.3", "0.6"],
    ]
    assert text.index("### noise") < text.index(headers[0]) < text.index("### prune") < text.index(headers[1])
    cell = frame[(frame["method"] == "watermas") & (frame["attack"] == "prune") & (frame["strength"] == 0.6)]
    expected = f"{cell['error'].mean():.2f} / {cell['detect_stat'].mean():.2f}"
    assert f"| {expected} (1/2) |" in text  # detected for one seed of two
    assert "| 2.25 / n/a " in text  # the unwatermarked method, clean: (2.0 + 2.5) / 2
    assert "| 2.75 / 0.98 ✓ " in text
    summary = next(line for line in text.splitlines() if line.startswith("| watermas"))
    assert "| 2.75 " in summary and "| +0.50 " in summary and "| 2.50 " in summary


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
    for suffix in (".csv", ".md"):
        first = (out / f"toy{suffix}").read_bytes()
        assert (tmp_path / "a" / f"toy{suffix}").read_bytes() == first
        assert (tmp_path / "b" / f"toy{suffix}").read_bytes() == first
    assert len(again) == len(reread) == 4
    assert not list(tmp_path.rglob("*.tmp"))


def test_awkward_frames_still_plot(frame: pd.DataFrame, tmp_path: Path) -> None:
    """One method only, an attack with a single strength, no detection statistic at all, big strengths."""
    odd = frame[frame["method"] == "none"].copy()
    odd.loc[odd["attack"] == "prune", "strength"] = 0.0
    quantize = odd[odd["attack"] == "noise"].assign(attack="quantize", strength=lambda f: f["strength"] * 320)
    odd = pd.concat([odd, quantize], ignore_index=True)
    odd["detect_stat"] = np.nan
    paths = plot_leaderboard(odd, tmp_path)
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)
    written = write_leaderboard(odd, tmp_path / "board", "odd")
    text = (tmp_path / "board" / "odd.md").read_text(encoding="utf-8")
    assert "### quantize" in text and "| 16 " in text
    assert len(written) == 4
