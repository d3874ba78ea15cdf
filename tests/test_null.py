"""The calibrated null: FPR near its nominal level on unwatermarked models, TPR from the null's quantiles."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from scipy import stats

from wmbench.cli import main
from wmbench.grid import expand
from wmbench.null import draw_null_keys, null_cutoff, true_positive_rate
from wmbench.registry import METHODS, MODELS
from wmbench.scenario import Component, load_scenario

SCENARIO = """
name: nulltiny
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 400}}]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods: [none, {name: watermas, args: {n_carriers: 128}}, {name: uchida, args: {bits: 64}}]
training: {epochs: 2}
attacks: [{name: noise, strengths: [0.3]}]
detection: {threshold: 0.05}
"""


@pytest.fixture(scope="module")
def null_csv(tmp_path_factory) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("null")
    (tmp / "s.yaml").write_text(SCENARIO)
    common = ["--cache", str(tmp / "c"), "--out", str(tmp / "lb"), "-q"]
    assert main(["run", str(tmp / "s.yaml"), *common]) == 0
    assert main(["null", str(tmp / "s.yaml"), "--keys", "70", *common]) == 0
    md = (tmp / "lb" / "nulltiny_null.md").read_text()
    assert "calibrated null" in md and "seeds 0, 1, 2" in md  # unwatermarked models trained up to 3 seeds
    frame = pd.read_csv(tmp / "lb" / "nulltiny_null.csv")
    assert (frame["device"].str.startswith("cpu")).all() and (frame["torch_threads"] >= 1).all()  # what the draws depend on
    return frame


def test_null_fpr_is_near_its_nominal_level(null_csv):
    """70 keys x 3 unwatermarked models (seed 0 and the added 1, 2) per method: the number of
    p-values below 0.05 is within binomial bounds of 5% (two-sided 1e-3), for the image mark
    (Pearson r) and the bit mark (bit accuracy) alike, clean and after noise."""
    assert set(null_csv.method) == {"watermas", "uchida"} and set(null_csv.attack) == {"clean", "noise"}
    for row in null_csv.itertuples():
        assert row.null_n == 210 and row.null_fp == round(row.fpr * 210)
        assert stats.binom.cdf(row.null_fp, 210, 0.05) > 5e-4 and stats.binom.sf(row.null_fp - 1, 210, 0.05) > 5e-4, row
        assert row.fpr_low <= 0.05 <= row.fpr_high or row.fpr_low <= row.fpr <= row.fpr_high


def test_watermarked_models_are_found_at_one_percent_fpr(null_csv):
    """The watermarked models score above the null's 99% quantile; 0.1% is not resolvable from 210
    draws and says so."""
    clean = null_csv[null_csv.attack == "clean"]
    assert (clean.wm_n == 1).all() and (clean.tpr_fpr1 == 1.0).all() and (clean.tpr_threshold == 1.0).all()
    assert clean.tpr_fpr01.isna().all() and clean.note.str.contains("1000 null draws").all()


def test_null_keys_are_drawn_on_a_copy(digits):
    """Substitutive methods write the mark into the model they get: the null model stays untouched."""
    scenario = load_scenario_text(SCENARIO)
    cell = expand(scenario)[0]
    torch.manual_seed(0)
    model = MODELS.build("small_cnn", {"width": 8, "hidden": 16}).build(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    drawn = draw_null_keys(Component("watermas", METHODS.build("watermas", {"n_carriers": 64})), model, digits, 3, cell, False, owners=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len({tuple(k.tensors["flat_idx"].tolist()) for k in drawn.keys}) == 3  # independent keys
    for i, key in enumerate(drawn.keys):  # each key's owner model: the model with what keygen wrote for that key
        owner = drawn.owner(i)
        assert set(drawn.edits[i]) and all(not torch.equal(before[k], v) for k, v in drawn.edits[i].items())
        assert float(METHODS.build("watermas", {"n_carriers": 64}).detect(owner, key).stat) > 0.99


def load_scenario_text(text: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text(text)
        return load_scenario(path, [])


def test_cutoff_and_tpr_count_strictly_above_the_null():
    null = [float(i) for i in range(100)]  # 0..99
    assert null_cutoff(null, 0.01) == 98.0  # one draw (99) above: FPR 1%
    assert null_cutoff(null, 0.001) is None  # fewer than 1000 draws
    assert true_positive_rate([99.0, 98.0, None, 120.0], 98.0) == 0.5


@pytest.mark.at_chance("plumbing: the trainings the null announces")
def test_null_announces_the_trainings_it_adds(tmp_path, capsys):
    """Before any work the null says how many unwatermarked models it trains and which seeds it adds;
    with everything cached it says nothing."""
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("subset_train: 400", "subset_train: 100").replace("epochs: 2", "epochs: 1"))
    args = ["null", str(tmp_path / "s.yaml"), "--keys", "2", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "null: 3 unwatermarked training(s) to do first; seeds 1, 2 added: the null needs at least 3" in err
    assert "holds no watermarked row of this scenario: the TPR columns will be n/a; run `wmbench run" in err  # before the draws
    assert main(["run", *args[1:2], *args[4:], "-q"]) == 0  # the grid, into the same cache: its rows give the TPR
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "to do first" not in err and "no watermarked row" not in err
    notes = set(pd.read_csv(tmp_path / "lb" / "nulltiny_null.csv")["note"].dropna())  # 2 keys x 3 models: 6 draws
    assert all("1% FPR needs >= 100 null draws, has 6" in n and "0.1% FPR needs >= 1000 null draws, has 6" in n for n in notes)


def test_null_markdown_gives_every_share_as_k_of_n_with_its_interval(null_csv):
    """FPR, p<0.01 and the TPR columns are counts with Wilson intervals (a bare "100.0%" from 1
    watermarked row said nothing of its uncertainty)."""
    import re

    from wmbench.null_report import null_markdown

    md = null_markdown(null_csv, "nulltiny", 70, [0, 1, 2])
    rows = [line for line in md.splitlines() if line.startswith("| watermas") or line.startswith("| uchida")]
    assert rows
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell in cells[3:8]:
            assert cell == "n/a" or re.fullmatch(r"\d+/\d+ \[\d+(\.\d)?%, \d+(\.\d)?%\]", cell), line
    assert "not independent samples" in md


def test_the_null_markdown_says_why_draws_failed_only_when_some_did(tmp_path):
    """The CSV's note gave the reason for failed draws, the Markdown did not: it now has a "Failed
    draws" section (only when some failed: a null without failures renders as before), read from
    the note, so a Markdown re-rendered from the CSV says the same. Reasons with parentheses and
    "; " of their own are kept whole."""
    import re

    from wmbench.null import NullSample
    from wmbench.null_report import null_markdown, null_table, write_null

    ok = NullSample(stats=[0.1, 0.2], pvalues=[0.5, 0.6])
    attack = NullSample(failed=4, failure="attack: RuntimeError: boom (at 2); again")
    detector = NullSample(stats=[0.3], pvalues=[0.4], failed=1, failure="detect: ValueError: bad | <b>x</b>", nonfinite=1, nonfinite_in="fc.weight")
    samples = {("cnn", "digits", "mark", "clean", 0.0): ok, ("cnn", "digits", "mark", "noise", 0.5): attack,
               ("cnn", "digits", "mark", "prune", 0.3): detector}
    csv, md = write_null(null_table(samples, {}, "s", 1e-6, "cpu", 1), tmp_path, "s", 2, [0, 1, 2])
    text = md.read_text(encoding="utf-8")
    failed = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in text.split("## Failed draws\n", 1)[1].splitlines() if line.startswith("| cnn")]
    assert failed == [["cnn", "digits", "mark", "noise", "0.5", "4", "attack: RuntimeError: boom (at 2); again"],
                      ["cnn", "digits", "mark", "prune", "0.3", "1", "detect: ValueError: bad \\| &lt;b>x&lt;/b>"]]
    assert null_markdown(pd.read_csv(csv), "s", 2, [0, 1, 2]) + "\n" == text  # the CSV alone renders it
    clean = null_markdown(null_table({k: v for k, v in samples.items() if not v.failed}, {}, "s", 1e-6, "cpu", 1), "s", 2, [0, 1, 2])
    assert "Failed draws" not in clean and "failed" not in clean.lower()


def test_a_resync_method_is_resynchronised_in_the_null_too(tmp_path):
    """The grid detects a `+resync` entry after matching the suspect onto the owner's model; its null
    must measure that detector, not the plain one: after dummy_neurons (units added, shapes changed)
    the plain detector cannot read the key at all (every draw skipped), the resynchronised one reads
    every draw, and an unwatermarked model stays unwatermarked after being matched (p < 0.01 rare)."""
    from wmbench.null import run_null

    text = SCENARIO.replace("methods: [none, {name: watermas, args: {n_carriers: 128}}, {name: uchida, args: {bits: 64}}]",
                            "methods: [none, {name: watermas, args: {n_carriers: 128}}, {name: watermas, label: watermas+resync, resync: true, args: {n_carriers: 128}}]")
    text = text.replace("attacks: [{name: noise, strengths: [0.3]}]", "attacks: [{name: permute, strengths: [1.0]}, {name: dummy_neurons, strengths: [0.5]}]")
    scenario = load_scenario_text(text)
    samples = run_null(scenario, tmp_path / "c", "cpu", 20, progress=False)
    plain, synced = (samples[("small_cnn", "digits", label, "dummy_neurons", 0.5)] for label in ("watermas", "watermas+resync"))
    assert plain.skipped == 60 and not plain.stats
    assert synced.skipped == 0 and synced.failed == 0 and len(synced.stats) == 60
    for attack, strength in (("clean", 0.0), ("permute", 1.0), ("dummy_neurons", 0.5)):
        pvalues = samples[("small_cnn", "digits", "watermas+resync", attack, strength)].pvalues
        assert len(pvalues) == 60 and sum(p < 0.01 for p in pvalues) <= 4, (attack, sorted(pvalues)[:5])


def test_a_null_with_no_method_to_measure_says_so(tmp_path, capsys):
    """A scenario whose only method is the unwatermarked reference has no detector to measure: one
    line, exit 2, nothing trained or written (it wrote an empty table and exited 0)."""
    (tmp_path / "s.yaml").write_text(SCENARIO)
    args = ["null", str(tmp_path / "s.yaml"), "--keys", "2", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"),
            "--set", "methods=[none]"]
    assert main(args) == 2
    assert "lists none but the unwatermarked reference" in capsys.readouterr().err
    assert not (tmp_path / "lb").exists() and not (tmp_path / "c" / "models").exists()


@pytest.mark.parametrize("keys", ["0", str(10**8 + 1), str(2**64)])
def test_a_key_count_out_of_range_is_one_line_before_any_training(tmp_path, capsys, keys):
    """--keys 2^64 was an OverflowError traceback (from the progress bar), after the trainings."""
    from conftest import TINY_SCENARIO

    (tmp_path / "s.yaml").write_text(TINY_SCENARIO.format(name="keys"))
    args = ["null", str(tmp_path / "s.yaml"), "--keys", keys, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "lb"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--keys must be in [1, 100,000,000]" in err, err
    assert not (tmp_path / "c" / "models").exists()
