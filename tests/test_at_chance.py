"""A watermark's cost is never judged, silently, on a model that has not learned: a clean classifier
at chance accuracy (``wmbench.metrics.at_chance``) is said in each of its rows' ``detect_note``,
warned of once per training and marked on the leaderboard; a learned model, and segmentation, are
left alone."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_scenario
from torch import nn

from wmbench.errors import AT_CHANCE_NOTE
from wmbench.leaderboard import _read_table, render_markdown
from wmbench.metrics import at_chance, at_chance_note, chance_accuracy
from wmbench.model_checks import still_batchnorm

SCENARIO = """
name: s
seeds: [0]
device: cpu
plugins: [{plugins}]
datasets: [{{name: digits, args: {{subset_train: 400}}}}]
models: [{model}]
methods: [{methods}]
training: {{epochs: {epochs}, batch_size: 32, lr: {lr}}}
attacks: [{{name: noise, strengths: [1.0]}}]
"""

# Four Conv-BatchNorm-ReLU blocks whose BatchNorms have the given momentum (torchvision MNASNet's: 3e-4).
SLOW_BN = '''
from dataclasses import dataclass

from torch import nn

from wmbench.models import Model
from wmbench.registry import MODELS


@MODELS.register("bn_blocks_{name}")
@dataclass(frozen=True)
class BNBlocks(Model):
    momentum: float = 0.1

    def build(self, data):
        layers, channels = [], data.in_channels
        for _ in range(4):
            layers += [nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, momentum=self.momentum), nn.ReLU()]
            channels = 16
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, data.num_classes))
'''


def _run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, epochs: int, lr: float, plugins: str = "",
    model: str = "{name: small_cnn, args: {width: 8, hidden: 16}}", methods: str = "none, {name: watermas, args: {n_carriers: 128}}",
) -> tuple[pd.DataFrame, list[str]]:
    """The run's CSV and its warnings about models at chance."""
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO.format(epochs=epochs, lr=lr, plugins=plugins, model=model, methods=methods))
    with caplog.at_level(logging.WARNING, logger="wmbench"):
        code, frame = run_scenario(path, tmp_path / "c")
    assert code == 0
    return frame, [r.getMessage() for r in caplog.records if AT_CHANCE_NOTE in r.getMessage()]


@pytest.mark.at_chance("the case under test: lr 1e-9 keeps the models at chance")
def test_a_model_that_did_not_learn_is_said_in_its_rows_warned_of_once_per_training_and_marked(tmp_path, caplog):
    """lr 1e-9: both trainings stay at their initialisation, about 10% on digits' 10 classes
    (watermas+align shares watermas's training: one warning for both)."""
    methods = "none, {name: watermas, args: {n_carriers: 128}}, {name: watermas, label: watermas+align, args: {n_carriers: 128, align: true}}"
    frame, warnings = _run(tmp_path, caplog, epochs=1, lr=1e-9, methods=methods)
    assert len(frame) == 6 and frame["error_clean"].gt(85).all()
    note = r"clean model at chance accuracy \(\d+\.\d% vs chance 10\.3%\): its attack and detection rows do not measure a watermark's cost"
    assert frame["detect_note"].str.contains(note).all(), frame["detect_note"].tolist()
    assert sorted(w.split(":")[0] for w in warnings) == ["small_cnn/digits/none/seed 0", "small_cnn/digits/watermas/seed 0"], warnings
    markdown = (tmp_path / "lb" / "s.md").read_text(encoding="utf-8")
    assert markdown.count(" (at chance) |") == 3  # each method's clean error
    assert "At chance: the clean model is at chance accuracy for none (1 of 1 seeds), watermas (1 of 1 seeds), watermas+align (1 of 1 seeds)" in markdown
    assert "At chance: the clean model" in (tmp_path / "lb" / "s.html").read_text(encoding="utf-8")


def test_a_model_that_learned_gets_no_note_nor_warning(tmp_path, caplog):
    frame, warnings = _run(tmp_path, caplog, epochs=3, lr=0.05)
    assert frame["error_clean"].lt(70).all() and not warnings
    assert not frame["detect_note"].astype("string").str.contains(AT_CHANCE_NOTE, na=False).any()
    assert "at chance" not in (tmp_path / "lb" / "s.md").read_text(encoding="utf-8")


@pytest.mark.at_chance("the case under test: a BatchNorm momentum of 3e-4 keeps the model at chance")
@pytest.mark.parametrize("name, momentum, at_chance_expected", [("slow", 3e-4, True), ("default", 0.1, False)])
def test_a_model_held_at_chance_by_its_batchnorm_momentum_is_warned_of_with_a_hint(tmp_path, caplog, name, momentum, at_chance_expected):
    """MNASNet's case in small: trained as well as the other, but evaluated with running statistics
    that 39 steps at momentum 3e-4 barely moved (10% against 57% at torch's default 0.1)."""
    (tmp_path / "bn.py").write_text(SLOW_BN.replace("{name}", name))  # a name per case: the registry is the process's
    frame, warnings = _run(tmp_path, caplog, epochs=3, lr=0.05, plugins=str(tmp_path / "bn.py"), model=f"{{name: bn_blocks_{name}, args: {{momentum: {momentum}}}}}", methods="none")
    assert frame["detect_note"].astype("string").str.contains(AT_CHANCE_NOTE, na=False).all() == at_chance_expected
    if at_chance_expected:
        assert len(warnings) == 1 and warnings[0].endswith(
            "(BatchNorm momentum 0.0003: its running statistics still hold about 99% of their initialisation after 39 steps)"), warnings
    else:
        assert not warnings and frame["error_clean"].lt(60).all()


def test_the_rule_is_a_one_sided_binomial_test_at_1e_3(digits):
    """360 test images, chance 37/360 (the most common class): 56 right (15.6%) is at chance,
    P[Binomial(360, 37/360) >= 56] = 0.0012; 57 is not, P = 0.0007."""
    assert len(digits.test_y) == 360 and chance_accuracy(digits) == pytest.approx(37 / 360)
    assert at_chance(56 / 360, digits) == pytest.approx(37 / 360) and at_chance(57 / 360, digits) is None
    assert at_chance_note(0.95, digits) is None and at_chance(float("nan"), digits) is None
    assert at_chance(0.1, replace(digits, task="segmentation")) is None  # mIoU: no chance level here


def test_chance_is_the_most_common_class_not_one_over_the_classes(digits):
    """A test split 70% of one class: always predicting it scores 70%, which is no learning."""
    skewed = replace(digits, test_y=torch.where(torch.arange(360) < 252, 0, digits.test_y))
    assert chance_accuracy(skewed) == pytest.approx(0.7 + (digits.test_y[252:] == 0).float().sum().item() / 360)
    assert at_chance(0.7, skewed) is not None and at_chance(0.9, skewed) is None


def test_a_batchnorm_whose_running_statistics_barely_move_is_said():
    """torchvision MNASNet's momentum 3e-4: after 100 steps 97% of the initial statistics remain."""
    slow = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=3e-4))
    assert still_batchnorm(slow, 100) == "BatchNorm momentum 0.0003: its running statistics still hold about 97% of their initialisation after 100 steps"
    assert still_batchnorm(slow, 10_000) is None
    assert still_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 100) is None  # torch's 0.1
    assert still_batchnorm(nn.Sequential(nn.BatchNorm2d(4, momentum=None)), 100) is None  # a cumulative average
    assert still_batchnorm(nn.Sequential(nn.Linear(2, 2)), 100) is None


def test_the_leaderboard_marks_the_seeds_at_chance_and_changes_nothing_else():
    """quickstart's watermas rows of seed 0 given the note: its clean error and a note under the
    summary say so; every attack table renders as published."""
    published = Path(__file__).resolve().parent.parent / "leaderboard" / "quickstart.csv"
    frame = _read_table(published)
    noted = frame.copy()
    rows = (noted["method"] == "watermas") & (noted["seed"] == 0)
    note = f"{AT_CHANCE_NOTE} (10.0% vs chance 10.3%): its attack and detection rows do not measure a watermark's cost"
    noted.loc[rows, "detect_note"] = [f"{n}; {note}" if isinstance(n, str) else note for n in noted.loc[rows, "detect_note"]]
    plain, marked = render_markdown(frame, "quickstart"), render_markdown(noted, "quickstart")
    assert plain == published.with_suffix(".md").read_text(encoding="utf-8") and "at chance" not in plain
    assert marked.count(" (at chance in 1 of 3 seeds) ") == 1 and marked.lower().count("at chance") == 3
    assert "\nAt chance: the clean model is at chance accuracy for watermas (1 of 3 seeds) (see `detect_note`)" in marked
    assert marked.split("\n### ", 1)[1] == plain.split("\n### ", 1)[1]


GUARDED = """
import logging

import pytest

from wmbench.errors import AT_CHANCE_NOTE


def _warn():
    logging.getLogger("wmbench.worker").warning("small_cnn/digits/none/seed 0: %s (10.0%% vs chance 10.3%%)", AT_CHANCE_NOTE)


def test_unmarked_at_chance():
    _warn()


@pytest.mark.at_chance("plumbing: only a row is written")
def test_marked_at_chance():
    _warn()


@pytest.mark.at_chance()
def test_marked_without_reason():
    pass


def test_learned():
    logging.getLogger("wmbench.worker").warning("another warning")
"""


def test_a_test_whose_grid_trains_a_model_at_chance_fails_unless_it_says_why(pytester):
    """The suite's guard (conftest's ``_learned``): a test that asserts robustness or cost on a
    model that did not learn fails loudly; a plumbing test says so with its reason."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_guarded=GUARDED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=4, errors=2)  # a guarded test passes its call, then errs at its teardown
    result.stdout.fnmatch_lines(["ERROR test_guarded.py::test_unmarked_at_chance - Failed: a model of this test*",
                                 "ERROR test_guarded.py::test_marked_without_reason - Failed: @pytest.mark.at_c*"])
