"""``wmbench curve``: the recipe's accuracy after every epoch, per seed; its last point is the
scenario's own unwatermarked operating point. And every attack's strength 0 is evaluated once."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from wmbench.cli import main
from wmbench.datasets.synthetic import Synthetic
from wmbench.data import hold_out
from wmbench.metrics import accuracy, accuracies_with_tta

SCENARIO = """
name: curvetiny
seeds: [0, 1]
device: cpu
datasets: [{name: digits, args: {subset_train: 400}}]
models: [{name: small_cnn, args: {width: 8, hidden: 16}}]
methods: [none]
training: {epochs: 3, lr: 0.05, schedule: warmup_linear, warmup_epochs: 0.5, translate: 1}
attacks: [{name: noise, strengths: [0.3]}, {name: prune, strengths: [0.5]}]
detection: {threshold: 1.0e-6}
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    tmp = tmp_path_factory.mktemp("curve")
    (tmp / "s.yaml").write_text(SCENARIO)
    common = ["--cache", str(tmp / "c"), "--out", str(tmp / "out"), "-q"]
    assert main(["curve", str(tmp / "s.yaml"), *common]) == 0
    assert main(["run", str(tmp / "s.yaml"), *common]) == 0
    curve = pd.read_csv(tmp / "out" / "curvetiny_curve.csv")
    return curve, pd.read_csv(tmp / "out" / "curvetiny.csv"), (tmp / "out" / "curvetiny_curve.md").read_text()


@pytest.mark.at_chance("plumbing: the curve's points and their times")
def test_one_point_per_seed_and_epoch_with_growing_minutes(outputs):
    curve, _, md = outputs
    assert sorted(zip(curve.seed, curve.epoch)) == [(s, e) for s in (0, 1) for e in (1, 2, 3)]
    for _, group in curve.groupby("seed"):
        assert group.sort_values("epoch").train_minutes.is_monotonic_increasing
    assert curve.metric_value.between(0, 1).all() and (curve.epochs == 3).all()
    assert "| small_cnn" in md and "seeds" in md
    assert curve.metric_value_flip.between(0, 1).all() and "with flip TTA" in md
    last = curve.epoch == 3  # the six-pass multi-crop accuracy is measured at the end only
    assert curve.metric_value_flip_translate[last].between(0, 1).all() and curve.metric_value_flip_translate[~last].isna().all()
    assert "with flip and translate TTA (last epoch)" in md
    assert curve.reference_images_per_s.nunique() == 1 and curve.reference_images_per_s.iloc[0] > 0
    assert "Reference throughput of the machine" in md


def test_flip_accuracy_averages_the_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    data = Synthetic(n_train=8, n_test=200, size=8).load(None)  # type: ignore[arg-type]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, data.num_classes))
    x = data.test_x
    with torch.no_grad():
        by_hand = ((model(x) + model(x.flip(-1))) / 2).argmax(1).eq(data.test_y).float().mean().item()
        plain = model(x).argmax(1).eq(data.test_y).float().mean().item()
    assert by_hand != plain  # the mirror matters for this model
    measured = accuracies_with_tta(model, data, torch.device("cpu"), "flip", batch_size=64)
    assert measured[:2] == pytest.approx((plain, by_hand)) and math.isnan(measured.flip_translate)
    assert accuracy(model, data, torch.device("cpu"), batch_size=64) == pytest.approx(plain)


def test_flip_translate_accuracy_adds_the_mirrored_one_pixel_shifts_up_left_and_down_right():
    torch.manual_seed(0)
    data = Synthetic(n_train=8, n_test=200, size=8).load(None)  # type: ignore[arg-type]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, data.num_classes))
    x = data.test_x
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    with torch.no_grad():
        views = [x, padded[..., :8, :8], padded[..., 2:, 2:]]
        both_ways = [(model(v) + model(v.flip(-1))) / 2 for v in views]
        by_hand = (both_ways[0] / 2 + both_ways[1] / 4 + both_ways[2] / 4).argmax(1).eq(data.test_y).float().mean().item()
    measured = accuracies_with_tta(model, data, torch.device("cpu"), "flip_translate", batch_size=64)
    assert measured.flip_translate == pytest.approx(by_hand) and measured.flip != pytest.approx(by_hand)


def test_each_point_is_printed_as_it_comes(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("seeds: [0, 1]", "seeds: [0]"))
    assert main(["curve", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out")]) == 0
    curve = pd.read_csv(tmp_path / "out" / "curvetiny_curve.csv")
    printed = capsys.readouterr().out
    for epoch, value in zip(curve.epoch, curve.metric_value):
        assert f"seed0 epoch {epoch}: accuracy {100 * value:.2f}%" in printed


def test_last_point_is_the_scenarios_unwatermarked_model(outputs):
    curve, rows, _ = outputs
    last = curve[curve.epoch == 3].set_index("seed").metric_value
    clean = rows[(rows.method == "none") & (rows.strength == 0)].groupby("seed").metric_value.first()
    pd.testing.assert_series_equal(last.sort_index(), clean.sort_index(), check_names=False)


def test_every_attacks_strength_zero_is_the_same_clean_evaluation(outputs):
    _, rows, _ = outputs
    clean = rows[rows.strength == 0]
    assert set(clean.attack) == {"noise", "prune"}
    for _, group in clean.groupby("seed"):
        assert group.metric_value.nunique() == 1 and group.detect_stat.nunique() == 1


VARIANTS = """
name: cleanonce
seeds: [0]
device: cpu
datasets: [{name: digits, args: {subset_train: 200}}]
models: [{name: small_cnn, args: {width: 4, hidden: 8}}]
methods: [{name: watermas, args: {n_carriers: 64}}, {name: watermas, label: watermas+align, args: {n_carriers: 64, align: true}}]
training: {epochs: 1}
attacks: [{name: noise, strengths: [0.3]}, {name: prune, strengths: [0.5]}, {name: quantize, strengths: [4]}]
"""


@pytest.mark.at_chance("plumbing: counts the detector's calls")
def test_strength_zero_is_detected_once_per_method_entry(tmp_path, monkeypatch):
    """Three attacks, two entries sharing one training (a detection-only variant): each entry's
    clean model is detected once (by its own detector, not the other entry's), each attack once."""
    import wmbench.worker as worker

    calls: list[str] = []
    real = worker.detect
    monkeypatch.setattr(worker, "detect", lambda method, *a, **k: calls.append(str(getattr(method, "align", None))) or real(method, *a, **k))
    (tmp_path / "s.yaml").write_text(VARIANTS)
    assert main(["run", str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "-q"]) == 0
    assert sorted(calls) == sorted(["False"] * 4 + ["True"] * 4)  # per entry: 1 clean + 3 attacked


def test_hold_out_moves_a_fixed_training_slice_to_the_test_split():
    data = Synthetic(n_train=50, n_test=7, size=8).load(None)  # type: ignore[arg-type]
    a, b = hold_out(data, 10), hold_out(data, 10)
    assert len(a.train_y) == 40 and len(a.test_y) == 10
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_x, b.train_x)  # the same slice every time
    rows = {tuple(r.tolist()) for r in data.train_x.flatten(1)}
    held, kept = ({tuple(r.tolist()) for r in x.flatten(1)} for x in (a.test_x, a.train_x))
    assert held | kept == rows and not held & kept  # a partition of the training split, no test image
    with pytest.raises(ValueError, match="hold-out"):
        hold_out(data, 49)


def test_holdout_curve_is_measured_off_the_test_set_and_written_apart(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("seeds: [0, 1]", "seeds: [0]"))
    common = [str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "-q"]
    assert main(["curve", *common, "--holdout", "100"]) == 0
    curve = pd.read_csv(tmp_path / "out" / "curvetiny_holdout_curve.csv")
    assert (curve.evaluated_on == "holdout 100 of train").all() and len(curve) == 3
    assert not (tmp_path / "out" / "curvetiny_curve.csv").exists()
    assert main(["curve", *common, "--holdout", "400"]) != 0  # digits subset_train 400: nothing left to train on
    assert "hold-out of 400" in capsys.readouterr().err


def test_each_seed_is_kept_when_its_training_ends_and_reused_by_the_next_run(tmp_path, monkeypatch):
    """A curve run again (after a crash, say) trains only the seeds it lacks: a damaged stored seed
    is trained again, the other is reused as measured; another recipe reuses nothing."""
    import wmbench.curve as curve_module

    (tmp_path / "s.yaml").write_text(SCENARIO)
    common = [str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "-q"]
    assert main(["curve", *common]) == 0
    first = pd.read_csv(tmp_path / "out" / "curvetiny_curve.csv")
    stored = sorted((tmp_path / "c" / "curves").glob("*.json"))
    assert len(stored) == 2
    stored[0].write_text("{not json")

    fits: list[str] = []
    real_fit = curve_module.Trainer.fit
    monkeypatch.setattr(curve_module.Trainer, "fit", lambda self, *a, **k: fits.append(self.desc) or real_fit(self, *a, **k))
    assert main(["curve", *common]) == 0
    again = pd.read_csv(tmp_path / "out" / "curvetiny_curve.csv")
    assert len(fits) == 1 and len(again) == len(first)
    same = [bool((again[again.seed == s].train_minutes.values == first[first.seed == s].train_minutes.values).all()) for s in (0, 1)]
    assert sorted(same) == [False, True]  # one seed reused as measured, the damaged one trained again
    assert f"seed{same.index(False)}" in fits[0]
    measured = ["train_minutes", "reference_images_per_s"]  # the rest is a deterministic training's
    pd.testing.assert_frame_equal(again.drop(columns=measured), first.drop(columns=measured))

    points = json.loads(stored[1].read_text())
    stored[1].write_text(json.dumps([{**p, "metric_value": "high"} for p in points]))  # every column, one of the wrong type
    assert main(["curve", *common]) == 0
    assert len(fits) == 2

    assert main(["curve", *common, "--set", "training.epochs=2"]) == 0
    assert len(fits) == 4  # a different recipe: both seeds trained


def test_every_k_epochs_measures_those_and_the_last_and_keeps_them_apart(tmp_path, capsys):
    """--every 2 on 3 epochs: points at epochs 2 and 3 only, the same values as the full curve
    there (a deterministic training); the full curve is not reused for it; --every 0 is refused."""
    (tmp_path / "s.yaml").write_text(SCENARIO.replace("seeds: [0, 1]", "seeds: [0]"))
    common = [str(tmp_path / "s.yaml"), "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "-q"]
    assert main(["curve", *common]) == 0
    full = pd.read_csv(tmp_path / "out" / "curvetiny_curve.csv")
    assert main(["curve", *common, "--every", "2"]) == 0
    sparse = pd.read_csv(tmp_path / "out" / "curvetiny_curve.csv")
    assert list(sparse.epoch) == [2, 3]
    assert list(sparse.metric_value) == list(full.metric_value[full.epoch >= 2])
    assert len(list((tmp_path / "c" / "curves").glob("*.json"))) == 2
    assert main(["curve", *common, "--every", "0"]) != 0
    assert "--every" in capsys.readouterr().err


def test_each_metric_is_labelled_on_its_own_rows():
    """A scenario with a classification and a segmentation dataset: the mIoU rows are not put under
    an 'accuracy %' header (the first row's metric), each metric heads its own table."""
    from wmbench.curve import COLUMNS, curve_markdown

    def point(model, dataset, metric, seed, epoch, value, flip):
        return {"scenario": "s", "model": model, "dataset": dataset, "seed": seed, "epoch": epoch, "epochs": 2,
                "train_minutes": 0.1 * epoch, "metric": metric, "metric_value": value, "metric_value_flip": flip,
                "metric_value_flip_translate": math.nan, "evaluated_on": "test", "torch_threads": 1, "device": "cpu",
                "reference_images_per_s": math.nan}

    rows = [point("small_cnn", "digits", "accuracy", s, e, 0.5, 0.55) for s in (0, 1) for e in (1, 2)]
    rows += [point("dl", "seg", "miou", s, e, 0.25, math.nan) for s in (0, 1) for e in (1, 2)]
    md = curve_markdown(pd.DataFrame(rows, columns=COLUMNS))
    tables = md.split("\n\n")
    assert len(tables) == 2
    accuracy_table, miou_table = tables
    assert "accuracy % (mean [95% CI])" in accuracy_table and "small_cnn" in accuracy_table and "| dl " not in accuracy_table
    assert "miou % (mean [95% CI])" in miou_table and "| dl " in miou_table and "small_cnn" not in miou_table
    assert "with flip TTA" in accuracy_table and "with flip TTA" not in miou_table  # segmentation has no flip accuracy
    one = curve_markdown(pd.DataFrame(rows[:4], columns=COLUMNS))  # one metric: one table, as before
    assert "\n\n" not in one and one.splitlines()[0].count("accuracy % (mean [95% CI])") == 1


def test_curve_table_keeps_printed_digits_and_marks_curves_under_three_seeds():
    """A one-seed figure keeps its two decimals (tabulate would print 87.00 as 87), and a curve of
    fewer than 3 seeds says so in its seeds column, as the leaderboard's tables do."""
    from wmbench.curve import curve_markdown

    rows = [{"model": "m", "dataset": "d", "epoch": e, "seed": s, "metric": "accuracy", "train_minutes": 1.0 * e,
             "metric_value": 0.87 if s == 0 else 0.89} for e in (1, 2) for s in (0, 1)]
    frame = pd.DataFrame(rows[:3])  # epoch 2 has one seed's point
    md = curve_markdown(frame)
    assert "| 87.00 " in md and "2 (under 3 seeds)" in md and "1 of 2 (1 not run; under 3 seeds)" in md
    three = pd.DataFrame([{**r, "seed": s} for r in rows[:2] for s in (0, 1, 2)])
    assert "under 3 seeds" not in curve_markdown(three)
